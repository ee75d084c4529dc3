"""Every error prefopt raises for a user to fix, and its exit code.

A `PrefoptError` is a user error: the CLI prints its message (no traceback) and exits with `exit_code`. Anything
else that escapes is a bug (exit 1, traceback in the run's log). Exit codes: 0 done, 1 bug, 2 a user error (bad
recipe, data, flag, environment), 3 a gate failed, 130/143/141 stopped by SIGINT / SIGTERM / a closed pipe
(prefopt.signals).
"""

from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_GATE = 0, 1, 2, 3


class PrefoptError(Exception):
    """A user error: printed as a clear message, exit code 2, no traceback."""

    exit_code = EXIT_USER


class DataError(PrefoptError):
    """A data file that cannot be used: names the file, the row and what is wrong.

    `key` is the stage's data key the problem belongs to (e.g. "eval_fraction"), when it is one key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class GateFailed(PrefoptError):
    """An evaluation gate failed: the run stops before the merge (exit code 3 from the CLI)."""

    exit_code = EXIT_GATE


class RecipeError(PrefoptError):
    """Every problem found in a recipe (or its data), one per line."""

    def __init__(self, problems: list[str], source: str | None = None, repaired: object | None = None, *,
                 subject: str = "the recipe"):
        self.problems = list(problems)
        self.source = source
        # the recipe with each bad value left out (its default used), when that validates: the later checks run
        # on it, so that one report lists every problem (prefopt.preflight.load_checked)
        self.repaired = repaired
        head = f"{source}: " if source else ""
        n = len(self.problems)
        super().__init__(
            f"{head}{n} problem{'s' if n != 1 else ''} in {subject}:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


SURFACE = {"cli": False}  # set by the command line: messages name its flags, else the API's keyword arguments


def option(name: str, arg: str | None = None) -> str:
    """How the user sets an option where they are: '--output-dir DIR' on the command line, 'output_dir=<dir>' in
    Python (prefopt.run, prefopt.merge)."""
    if SURFACE["cli"]:
        return f"--{name.replace('_', '-')}" + (f" {arg}" if arg else "")
    return f"{name}=" + (f"<{arg.lower()}>" if arg else "True")


def environment_error(e: OSError) -> PrefoptError | None:
    """A read-only folder, a full disk, permission denied, a path that is a file: a user error naming the path and
    what to do (None for an OSError that is not about the machine's file system)."""
    import errno

    out = option("output_dir", "DIR")
    why = {errno.EROFS: ("the file system is read-only", f"choose a folder on a writable disk ({out})"),
           errno.ENOSPC: ("the disk is full", f"free some space, or choose a folder on a larger disk ({out})"),
           errno.EDQUOT: ("the disk quota is exceeded", f"free some space, or choose another folder ({out})"),
           errno.EACCES: ("permission denied", f"choose a folder you can write ({out}), or fix its permissions"),
           errno.EPERM: ("operation not permitted", f"choose a folder you can write ({out})"),
           errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
           errno.EISDIR: ("it is a folder", "choose another path")}.get(e.errno)
    if why is None:
        return None
    path = f"{e.filename}: " if e.filename else ""
    return PrefoptError(f"{path}{why[0]}; {why[1]}")


class RunFolderError(PrefoptError):
    """An output folder prefopt must not write into (or clear) as asked."""


class MergeError(PrefoptError):
    """An adapter or base that cannot be merged as asked, or a merge that failed verification."""


class TrainingDiverged(PrefoptError):
    """A stage's loss or gradient norm went NaN, infinite or exploded: training stopped there (exit code 2)."""


class SweepIncomplete(PrefoptError):
    """Some points of a sweep failed (the others ran; its table says which): exit 2, or 1 when a point failed on a
    bug."""

    def __init__(self, message: str, exit_code: int = EXIT_USER):
        super().__init__(message)
        self.exit_code = exit_code
