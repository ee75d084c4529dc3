"""A stage's progress on the console: a bar refreshed in place on a terminal, one fixed-width line per logging step
otherwise (CI logs, `| tee`), with the stage's key numbers as numbers. It replaces transformers' tqdm bar and its
printed log dicts (those stay in the run's log file and in the stage's log_history.json)."""

from __future__ import annotations

import functools
import math
import time

from .. import console

# the numbers a person watches, per kind of stage: (label, log key, format)
SFT_KEYS = (("loss", "loss", "{:.4f}"), ("lr", "learning_rate", "{:.2e}"), ("grad", "grad_norm", "{:.3f}"))
PREFERENCE_KEYS = (("loss", "loss", "{:.4f}"), ("acc", "rewards/accuracies", "{:.2f}"),
                   ("margin", "rewards/margins", "{:+.3f}"), ("logp+", "logps/chosen", "{:.2f}"),
                   ("logp-", "logps/rejected", "{:.2f}"))
# KTO: rewards of the desirable (+) and undesirable (-) rows, their margin, and the batch KL estimate
KTO_KEYS = (("loss", "loss", "{:.4f}"), ("kl", "kl", "{:.3f}"), ("margin", "rewards/margins", "{:+.3f}"),
            ("rwd+", "rewards/chosen", "{:+.3f}"), ("rwd-", "rewards/rejected", "{:+.3f}"))


def keys_for(stage_type: str, logs: dict | None = None) -> tuple:
    """The figures shown for a stage type; a multi-loss DPO adds each loss's part (loss/<name>)."""
    if stage_type == "sft":
        return SFT_KEYS
    if stage_type == "kto":
        return KTO_KEYS
    parts = tuple((k, k, "{:.4f}") for k in (logs or {}) if k.startswith("loss/"))
    return PREFERENCE_KEYS[:1] + parts + PREFERENCE_KEYS[1:]


def clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def figures(logs: dict, stage_type: str, tokens_per_s: float | None = None) -> str:
    """The key numbers of one log record, fixed width: 'loss 0.6785  acc 0.75  margin +0.030 ...'."""
    parts = []
    for label, key, fmt in keys_for(stage_type, logs):
        v = logs.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {fmt.format(v)}")
    if tokens_per_s is not None:
        parts.append(f"tok/s {tokens_per_s:,.0f}")
    return "  ".join(parts)


def tokens_per_s(stage_type: str, logs: dict, last) -> tuple[float | None, tuple | None]:
    """SFT's tokens per second since the last log, and the (time, num_tokens) to keep for the next."""
    n = logs.get("num_tokens")
    if stage_type != "sft" or not isinstance(n, (int, float)):
        return None, last
    now = time.monotonic()
    if last is None or now <= last[0] or n < last[1]:
        return None, (now, n)
    return (n - last[1]) / (now - last[0]), (now, n)


def eval_where(state, text: str, last_eval, ended: bool) -> str | None:
    """Which evaluation a held-out line reports: at a step, or -- after training -- the best checkpoint's (the
    adapter kept); None when it repeats the evaluation said last."""
    if not ended:
        return f"at step {state.global_step}"
    best = state.best_model_checkpoint
    step = int(best.rsplit("-", 1)[1]) if best else state.global_step
    if last_eval == (step, text):
        return None
    return f"of the best checkpoint (step {step}), the adapter kept" if best else f"at step {state.global_step}"


def _bar(name: str, total: int, done: int):
    """A rich progress bar on prefopt's console, and its task."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(f"  {name:<8}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[figures]}"),
                   console=Console(file=console.stream()), redirect_stdout=False, redirect_stderr=False,
                   transient=False)
    task = bar.add_task(name, total=total, completed=done, figures="")
    bar.start()
    return bar, task


def progress_callback(name: str, stage_type: str, index: int, total: int):
    """The callback `prefopt run` trains each stage with (see the module's docstring)."""
    return _progress_class()(name, stage_type, index, total)


@functools.cache
def _progress_class():
    from transformers import TrainerCallback  # (a heavy import: the class is made on first use)

    class ProgressCallback(TrainerCallback):
        replaces_tqdm = True

        def __init__(self, name: str, stage_type: str, index: int, total: int):
            self.name, self.type, self.index, self.total = name, stage_type, index, total
            self.bar = self.task = None
            self.start = self.first_step = None
            self.tokens = None  # (time, num_tokens) of the last log: SFT's tokens per second
            self.shown = False

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.monotonic()
            self.first_step = state.global_step  # a resumed stage starts further on
            if not state.is_world_process_zero or console.level() == console.QUIET:
                return
            if console.is_terminal():
                self.bar, self.task = _bar(self.name, state.max_steps, state.global_step)

        def _eta(self, state) -> float | None:
            done = state.global_step - (self.first_step or 0)
            if done <= 0:
                return None
            return (time.monotonic() - self.start) / done * (state.max_steps - state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or console.level() == console.QUIET:
                return
            if "train_runtime" in logs:  # the trainer's closing summary: the stage's done line says it
                return
            if any(k.startswith("eval_") for k in logs):
                self._eval_line(state, logs)
                return
            text = figures(logs, self.type, self._tokens_per_s(logs))
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step, figures=text)
                return
            width = len(str(state.max_steps))
            console.say(f"  {self.name:<8} step {state.global_step:>{width}}/{state.max_steps}  {text}  "
                        f"{clock(time.monotonic() - self.start)}<{clock(self._eta(state))}")

        def _tokens_per_s(self, logs) -> float | None:
            rate, self.tokens = tokens_per_s(self.type, logs, self.tokens)
            return rate

        def _eval_line(self, state, logs) -> None:
            stripped = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_")}
            text = figures(stripped, self.type)
            where = eval_where(state, text, getattr(self, "last_eval", None), getattr(self, "ended", False))
            if where is None:
                return
            self.last_eval = (state.global_step, text)
            line = f"  {self.name:<8} held-out {where}: {text}"
            if self.bar is not None:
                self.bar.console.print(line, markup=False, highlight=False)
            else:
                console.say(line)

        def on_train_end(self, args, state, control, **kw):
            self.ended = True
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)
            self.close()

        def close(self) -> None:
            """Stop the bar (also when training raised: the cursor shown again, the next line on a line of its own)."""
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return ProgressCallback
