"""The user cache: where prefopt keeps what outlives a run folder. One folder, one environment variable.

    $PREFOPT_CACHE_DIR, else ~/.cache/prefopt
      stages/ ref_logps/    finished stages and reference log-probs, shared across run folders (prefopt.runs.store;
                            a recipe's cache_dir overrides the folder, 'off' turns sharing off)
      eval/                 base-model MMLU results (prefopt.eval)
      logs/                 logs that have no run folder to go to (prefopt.console)
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PREFOPT_CACHE_DIR"


DEFAULT = Path("~/.cache/prefopt")


def cache_root() -> Path:
    """The user cache folder (not created here). PREFOPT_CACHE_DIR=off turns the shared store off
    (prefopt.runs.store); the rest of the cache then stays in the default folder."""
    given = os.environ.get(CACHE_ENV)
    if given and given.lower() != "off":
        return Path(given).expanduser()
    return DEFAULT.expanduser()
