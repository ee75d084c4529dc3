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
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from contextlib import contextmanager
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


# ---- a command's console: prefopt's lines on the console, everything else in a log file -------------------------
#
# `captured()` points file descriptors 1 and 2 (Python's and C's writes, every library's warnings, progress bars and
# log records) at a log file, and keeps a copy of the original stderr for prefopt's own lines (`say`). The log is
# moved into the run folder at the end (`keep_log`: logs/run.log, the previous attempts as run.1.log ... run.5.log).

# progress bars and chatter that would only fill the log (set, unless already set, while a command is captured)
NOISE_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# third-party warnings a person should see anyway: one `prefopt: note:` line each (the full text is in the log)
NOTES = (
    ("Token indices sequence length is longer than", "a tokenized row is longer than the model's maximum length"),
    ("does not have a chat template", "the tokenizer has no chat template"),
    ("You are using a model of type", "the checkpoint's model type differs from the class loading it"),
    ("Some weights of", "some weights of the checkpoint were not used or newly initialized"),
)
NOTE_LOGGERS = ("", "transformers")
QUIET, NORMAL, VERBOSE = 0, 1, 2
SESSION: dict = {"console": None, "log": None, "level": NORMAL, "noted": set()}


def level() -> int:
    return SESSION["level"]


def stream():
    """Where prefopt's own lines go: the console a person reads (sys.stderr when nothing is captured)."""
    return SESSION["console"] or sys.stderr


def is_terminal() -> bool:
    """Whether a person watches a terminal (progress refreshed in place) or output goes to a file or pipe (one line
    per step)."""
    try:
        return stream().isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError, OSError):
        return False


def say(line: str, *, important: bool = False) -> None:
    """One of prefopt's lines: on the console (not under --quiet unless important) and in the log."""
    important = important or line.startswith(("prefopt: warning", "prefopt: note", "prefopt: error"))
    if SESSION["console"] is None and SESSION.get("echo") is not None:  # the Python API's echo (see speaking)
        if important or level() > QUIET:
            SESSION["echo"](line)
        return
    out = stream()
    if SESSION["console"] is not None and not getattr(out, "_dead", False):
        _to_log_file(line + "\n")  # (a closed console writes what it is given to the log itself)
    if important or level() > QUIET:
        out.write(line + "\n")
        out.flush()


@contextmanager
def speaking(echo, quiet: bool = False):
    """The Python API's run: prefopt's lines (progress included) go to `echo`, or nowhere when quiet."""
    before = (SESSION.get("echo"), SESSION["level"])
    SESSION.update(echo=echo, level=QUIET if quiet else NORMAL)
    try:
        yield
    finally:
        SESSION["echo"], SESSION["level"] = before


def _to_log_file(text: str) -> None:
    log = SESSION["log"]
    if log is None:
        return
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        pass


def run_log() -> Path | None:
    """The log of the command being captured (None when nothing is captured)."""
    return SESSION["log"] if SESSION["console"] is not None else None


def last_log() -> Path | None:
    """The log of the last captured command (where its error messages point)."""
    return SESSION["log"]


@contextmanager
def captured(name: str = "run", verbosity: int = NORMAL):
    """Run a command with third-party output in a log file: `with captured("run"): ...`. Under --verbose the
    output goes to the console as well. Nested use is a no-op."""
    if SESSION["console"] is not None:
        yield SESSION["log"]
        return
    SESSION["count"] = SESSION.get("count", 0) + 1
    log = log_dir() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{SESSION['count']}.log"
    log.touch()
    env_before = {k: os.environ.get(k) for k in NOISE_ENV}
    if verbosity < VERBOSE:
        for k, v in NOISE_ENV.items():
            os.environ.setdefault(k, v)
    saved = _redirect(log, verbosity)
    SESSION.update(log=log, level=verbosity, noted=set())
    STATE["log"] = log  # a console pipe that closes: the rest goes to the same log
    old_showwarning = warnings.showwarning
    warnings.showwarning = _showwarning
    noter = _NoteHandler(logging.WARNING)
    for name in NOTE_LOGGERS:  # (transformers' logger does not propagate to the root)
        logging.getLogger(name).addHandler(noter)
    try:
        yield log
    finally:
        for name in NOTE_LOGGERS:
            logging.getLogger(name).removeHandler(noter)
        warnings.showwarning = old_showwarning
        _restore(saved)
        SESSION.update(console=None, level=NORMAL)
        _tidy(log)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tidy(log: Path, keep: int = 100) -> None:
    """An empty log goes; the user's log folder keeps the newest KEEP command logs."""
    try:
        if log.is_file() and log.stat().st_size == 0:
            log.unlink()
            SESSION["log"] = None
        old = sorted((p for p in log.parent.glob("*-*-*.log") if p.is_file()), key=lambda p: p.stat().st_mtime)
        for p in old[:-keep]:
            p.unlink()
    except OSError:
        pass


def _showwarning(message, category, filename, lineno, file=None, line=None):
    """A Python warning: into the log; as one `prefopt: note:` when it is one a person should see."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    try:
        sys.stderr.write(text)
    except (OSError, ValueError):
        pass
    _maybe_note(str(message))


class _NoteHandler(logging.Handler):
    """A library's logged warning (transformers logs most of its warnings): a note when it is one that matters."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _maybe_note(record.getMessage())
        except Exception:  # a note must never break a run
            pass


def _maybe_note(text: str) -> None:
    for pattern, note in NOTES:
        if pattern in text and note not in SESSION["noted"]:
            SESSION["noted"].add(note)
            say(f"prefopt: note: {note} (details in the log)")


def _fd_of(s) -> int | None:
    try:
        return s.fileno()
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def _redirect(log: Path, verbosity: int) -> dict:
    """Point stdout and stderr at the log. With real descriptors 1 and 2 (a command line), the descriptors
    themselves move (C-level writes too); otherwise (a test runner's streams) sys.stdout and sys.stderr do."""
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (AttributeError, ValueError, OSError):
            pass
    if _fd_of(sys.stderr) == 2 and _fd_of(sys.stdout) == 1:
        console_fd = os.dup(2)
        saved = {"fds": (os.dup(1), os.dup(2)), "tee": None}
        target = os.open(log, os.O_WRONLY | os.O_APPEND)
        if verbosity >= VERBOSE:  # everything to the console as well: a pipe that a thread copies to both
            r, w = os.pipe()
            # the thread owns its own copies: a child process that keeps the pipe open (wandb's service) keeps the
            # thread alive, writing where it should, never to a descriptor number reused after the command
            saved["tee"] = threading.Thread(target=_tee, args=(r, target, os.dup(console_fd)), daemon=True)
            saved["tee"].start()
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.close(w)
        else:
            os.dup2(target, 1)
            os.dup2(target, 2)
            os.close(target)
        raw = os.fdopen(console_fd, "w", buffering=1, encoding=getattr(sys.__stderr__, "encoding", None) or "utf-8",
                        errors="replace")
        SESSION["console"] = _Guarded(raw, "stderr")
        return saved
    console = sys.stderr
    f = open(log, "a", buffering=1, encoding="utf-8")
    saved = {"streams": (sys.stdout, sys.stderr), "file": f}
    sys.stdout = sys.stderr = f if verbosity < VERBOSE else _Both(f, console)
    SESSION["console"] = console
    return saved


class _Both(io.TextIOBase):
    def __init__(self, *streams):
        self._streams = streams

    def write(self, text: str) -> int:
        for s in self._streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self._streams:
            s.flush()


def _tee(r: int, log_fd: int, console_fd: int) -> None:
    with os.fdopen(r, "rb", buffering=0) as src:
        while chunk := src.read(65536):
            for fd in (log_fd, console_fd):
                try:
                    os.write(fd, chunk)
                except OSError:
                    pass
    os.close(log_fd)
    os.close(console_fd)


def _restore(saved: dict) -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (AttributeError, ValueError, OSError):
            pass
    if "fds" in saved:
        out, err = saved["fds"]
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        if saved["tee"] is not None:  # the pipe's last writer is gone: the thread sees its end
            saved["tee"].join(timeout=0.5)
        console = SESSION["console"]
        try:
            console.flush()
            console._stream.close()
        except (AttributeError, OSError, ValueError):
            pass
    else:
        sys.stdout, sys.stderr = saved["streams"]
        saved["file"].close()


def keep_log(log: Path | None, run_dir: Path | None, *, name: str = "run", keep: int = 5) -> Path | None:
    """Move a command's log into RUN_DIR/logs/NAME.log; the attempts before it become NAME.1.log (the last) to
    NAME.KEEP.log. Returns where the log is (where it was when the run folder cannot take it)."""
    if log is None or not log.is_file():
        return log
    if run_dir is None:
        return log
    logs = Path(run_dir) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(keep, 0, -1):
            older = logs / (f"{name}.{i - 1}.log" if i > 1 else f"{name}.log")
            if older.exists():
                os.replace(older, logs / f"{name}.{i}.log")
        dest = logs / f"{name}.log"
        shutil.move(str(log), dest)
    except OSError:
        return log
    if STATE["log"] == log:
        STATE["log"] = dest
    if SESSION["log"] == log:
        SESSION["log"] = dest
    return dest
