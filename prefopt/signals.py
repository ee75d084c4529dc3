"""SIGTERM (what SLURM and other schedulers send before killing a job) handled like Ctrl-C, but gracefully inside
training: the step in progress finishes, a checkpoint is written, and the run stops with exit code 143.

Outside training the signal interrupts at once (there is nothing to save)."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM); finished work and the last checkpoint are kept."""


STATE = {"stop": False, "training": False}


def _on_sigterm(signum, frame):
    STATE["stop"] = True
    if not STATE["training"]:
        raise Terminated()


def install() -> None:
    STATE.update(stop=False, training=False)
    signal.signal(signal.SIGTERM, _on_sigterm)


def stop_requested() -> bool:
    return STATE["stop"]
