"""The console when its reader goes away: `prefopt run ... | tee log` after Ctrl-C killed tee, `| head`.

Writing to a closed pipe raises BrokenPipeError wherever the write happens (a progress bar inside training, the
last message): the run would die with a traceback and exit code 1, and its last words would be lost. `guard()`
wraps stdout and stderr: the first failed write asks the run to stop gracefully (a checkpoint, then exit 141 --
or 130/143 when a signal came too), points the dead descriptor at /dev/null (so Python's own flush at exit cannot
fail), and sends everything after it to a log file in the user's cache, whose path is said there.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import time
from pathlib import Path

from . import signals
from .cachedir import DEFAULT, cache_root

_GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET, errno.EBADF)
STATE: dict = {"log": None, "closed": False}


def log_dir() -> Path:
    """Where prefopt writes logs that have no run folder to go to (or whose run folder cannot be written):
    the user cache's logs/ (prefopt.cachedir), else the default cache's, else the temp folder."""
    import tempfile

    for d in dict.fromkeys([cache_root() / "logs", DEFAULT.expanduser() / "logs",
                            Path(tempfile.gettempdir()) / "prefopt-logs"]):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            return d
        except OSError:
            continue
    return Path(tempfile.gettempdir())


def console_log() -> Path:
    if STATE["log"] is None:
        STATE["log"] = log_dir() / f"console-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    return STATE["log"]


class _Guarded(io.TextIOBase):
    def __init__(self, stream, name: str):
        self._stream = stream
        self._name = name
        self._dead = False

    def _to_log(self, text: str) -> None:
        try:
            with open(console_log(), "a", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            pass

    def _closed_pipe(self) -> None:
        self._dead = True
        STATE["closed"] = True
        try:  # the descriptor now points at /dev/null: Python's flush at exit cannot fail (exit code 120)
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

        signals.request_stop("pipe")
        self._to_log(f"prefopt: the console ({self._name}) closed at {time.strftime('%H:%M:%S')}; the run stops at "
                     "the next step's end with a checkpoint (exit code 141); the rest of its output follows\n")

    def write(self, text: str) -> int:
        if self._dead:
            self._to_log(text)
            return len(text)
        try:
            n = self._stream.write(text)
            if "\n" in text:
                self._stream.flush()
            return n
        except OSError as e:
            if isinstance(e, BrokenPipeError) or e.errno in _GONE:
                self._closed_pipe()
                self._to_log(text)
                return len(text)
            raise

    def flush(self) -> None:
        if self._dead:
            return
        try:
            self._stream.flush()
        except OSError as e:
            if isinstance(e, BrokenPipeError) or e.errno in _GONE:
                self._closed_pipe()
            else:
                raise

    def isatty(self) -> bool:
        return not self._dead and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    @property
    def buffer(self):
        return getattr(self._stream, "buffer", None)

    def writable(self) -> bool:
        return True


def guard() -> None:
    """Wrap sys.stdout and sys.stderr (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Guarded):
            setattr(sys, name, _Guarded(stream, name))


def closed() -> bool:
    return STATE["closed"]
