"""The user cache: where prefopt keeps what outlives a run folder. One folder, one environment variable.

    $PREFOPT_CACHE_DIR, else $XDG_CACHE_HOME/prefopt, else ~/.cache/prefopt
      stages/ ref_logps/    finished stages and reference log-probs, shared across run folders (prefopt.runs.store;
                            a recipe's cache_dir overrides the folder, 'off' turns sharing off)
      eval/                 base-model MMLU results (prefopt.eval)
      logs/                 logs that have no run folder to go to (prefopt.console)
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PREFOPT_CACHE_DIR"


def cache_root() -> Path:
    """The user cache folder (not created here)."""
    given = os.environ.get(CACHE_ENV)
    if given and given.lower() != "off":
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefopt"
