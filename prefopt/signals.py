"""Stopping a run: SIGINT (Ctrl-C), SIGTERM (what SLURM and other schedulers send before killing a job) and a
closed console pipe (`prefopt run ... | tee log` or `| head` when the reader goes away).

Inside training each of them stops gracefully: the step in progress finishes, a checkpoint is written, and the
run stops (run.json: "interrupted"). A second Ctrl-C stops at once. Outside training a signal interrupts at once
(there is nothing to save). Exit codes: 130 (SIGINT), 143 (SIGTERM), 141 (the console pipe closed, as a process
killed by SIGPIPE) -- a signal's code wins over a closed pipe's, whatever happened to the pipe.
"""

from __future__ import annotations

import signal

EXIT_CODES = {"sigint": 130, "sigterm": 143, "pipe": 141}
WORDS = {"sigint": "interrupted (Ctrl-C)", "sigterm": "terminated (SIGTERM)",
         "pipe": "stopped: the console pipe closed"}


class Terminated(KeyboardInterrupt):
    """The run was asked to stop (a signal, or the console pipe closed); finished work and the last checkpoint
    are kept. `reason`: sigint | sigterm | pipe."""

    def __init__(self, reason: str | None = None):
        super().__init__()
        self.reason = reason or STATE["reason"] or "sigterm"


STATE = {"stop": False, "training": False, "reason": None}


def request_stop(reason: str) -> None:
    """Stop at the next step's end (in training), or now (outside it, for a signal)."""
    if STATE["reason"] in (None, "pipe"):  # a signal's reason wins over a closed pipe
        STATE["reason"] = reason
    STATE["stop"] = True


def _on_signal(signum, frame):
    reason = "sigint" if signum == signal.SIGINT else "sigterm"
    again = STATE["stop"] and STATE["reason"] == reason
    request_stop(reason)
    if not STATE["training"] or (again and reason == "sigint"):  # a second Ctrl-C: at once
        raise Terminated(reason)


_BEFORE: dict = {}


def install() -> None:
    STATE.update(stop=False, training=False, reason=None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        _BEFORE.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, _on_signal)


def uninstall() -> None:
    """The handlers as they were before install() (a caller that ran prefopt's command line in-process)."""
    for sig, handler in list(_BEFORE.items()):
        try:
            signal.signal(sig, handler)
        except (ValueError, TypeError):  # not the main thread, or a handler Python cannot set back
            pass
    _BEFORE.clear()


def stop_requested() -> bool:
    return STATE["stop"]


def exit_code(err: BaseException | None = None) -> int:
    """The exit code of a stopped run."""
    reason = getattr(err, "reason", None) or STATE["reason"] or "sigint"
    return EXIT_CODES.get(reason, 130)


def words(err: BaseException | None = None) -> str:
    reason = getattr(err, "reason", None) or STATE["reason"] or "sigint"
    return WORDS.get(reason, "interrupted")
