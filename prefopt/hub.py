"""The Hugging Face hub, asked at most once per id with a short timeout -- never a retry storm.

Without a network and without HF_HUB_OFFLINE, transformers and datasets retry an unreachable hub for 25-50 s per
file before they fail. Preflight asks the hub once (one request, `PREFOPT_HUB_TIMEOUT` seconds, default 5): when
it cannot be reached, the process works offline from the local cache from then on (as HF_HUB_OFFLINE=1 would),
and whatever is not cached is a recipe problem reported in seconds.
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_STATE: dict = {"unreachable": None}  # None: not asked yet; "" reachable; else why not


def offline() -> bool:
    """HF_HUB_OFFLINE is set (by the user, or by go_offline())."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() \
            in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def go_offline() -> None:
    """Work from the local cache for the rest of this process and its children (HF_HUB_OFFLINE=1)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub and transformers
    import sys

    if "datasets.config" in sys.modules:  # datasets keeps its own copy, also read at import time
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def timeout() -> float:
    try:
        return max(float(os.environ.get("PREFOPT_HUB_TIMEOUT", "5")), 0.1)
    except ValueError:
        return 5.0


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def ask(repo_id: str, *, kind: str = "model", revision: str | None = None) -> tuple[str, str]:
    """One request for a model or dataset repo: ("ok" | "missing" | "gated" | "revision" | "unreachable", detail).
    'unreachable' (no network, DNS, a timeout, the hub's own 5xx) is remembered for the process."""
    if _STATE["unreachable"]:
        return "unreachable", _STATE["unreachable"]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    info = api.model_info if kind == "model" else api.dataset_info
    try:
        info(repo_id, revision=revision, timeout=timeout())
    except GatedRepoError as e:
        _STATE["unreachable"] = ""
        return "gated", _first_line(e)
    except RevisionNotFoundError as e:
        _STATE["unreachable"] = ""
        return "revision", _first_line(e)
    except RepositoryNotFoundError as e:
        _STATE["unreachable"] = ""
        return "missing", _first_line(e)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status < 500:
            _STATE["unreachable"] = ""
            return "missing", _first_line(e)
        _STATE["unreachable"] = f"{type(e).__name__}: {_first_line(e)}"
        return "unreachable", _STATE["unreachable"]
    except Exception as e:  # connection refused, DNS, timeout, proxy: the transport's own error types
        _STATE["unreachable"] = f"{type(e).__name__}: {_first_line(e)}"
        return "unreachable", _STATE["unreachable"]
    _STATE["unreachable"] = ""
    return "ok", ""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def unreachable() -> str | None:
    """Why the hub could not be reached, when this process asked it and it could not; else None."""
    return _STATE["unreachable"] or None


def reset() -> None:
    """Forget what the hub answered (tests)."""
    _STATE["unreachable"] = None
