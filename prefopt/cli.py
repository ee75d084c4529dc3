"""The command line: thin. Every command runs through `_handled` (errors.py's exit codes); heavy imports (torch,
transformers, trl) happen inside the functions that need them, so `prefopt --help` answers at once."""

from __future__ import annotations

import contextlib
import json
import sys
import typing
from pathlib import Path

import click

from . import console, errors, signals
from .config import MergeSection, ModelSection, defaults, load_recipe
from .dist import is_main, rank, world_size
from .errors import EXIT_BUG, EXIT_USER, PrefoptError, environment_error
from .eval.card import write_model_card
from .eval.log import add_review
from .eval.run import describe
from .memory import parse_size, recipe_memory_plan
from .merging.stream import Thresholds, merge_adapter
from .pipeline import run as run_pipeline
from .plan import default_gpu_memory, make_plan
from .preflight import load_checked, preflight
from .report import build_report
from .runs import folder as runfolder
from .runs.folder import log_paths, run_folder_of
from .runs.records import COMMITTED, forget_committed
from .runs.status import list_runs, render_list, run_status
from .runs.status import render as render_status
from .steps.data import run_data_step
from .steps.evaluate import evaluate_existing
from .steps.merge import merge_run
from .sweep import SweepSpec, parse_set_items, prepare, read_sweep_file, run_sweep
from .version import __version__

_MERGE = defaults(MergeSection)  # the recipe schema's merge defaults


def _choices(section, key: str) -> list[str]:
    """A Literal field's values, from the schema."""
    return list(typing.get_args(section.model_fields[key].annotation))


def _fail(err: Exception) -> None:
    """A user error: exit code 2; a failed evaluation gate: exit code 3 (GateFailed.exit_code). Under torchrun only
    the main process says it (every rank exits with the same code)."""
    if is_main() and not getattr(err, "said", False):  # (said: by a process of its own, `prefopt eval`)
        line = f"prefopt: error: {err}"
        _append_to_log(line)
        click.echo(line + (_log_hint() if COMMITTED["run_dir"] is not None else ""), err=True)
    sys.exit(getattr(err, "exit_code", EXIT_USER))


def _append_to_log(line: str) -> None:
    log = console.last_log()
    if log is not None:
        with contextlib.suppress(OSError):
            with open(log, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _bug(err: BaseException, run_dir=None) -> None:
    """An error prefopt did not foresee: one line, and the full traceback in a log file (exit code 1). The log goes
    to the run folder's logs/ when that can be written, else to the user's cache (never a second error)."""
    import traceback

    if not is_main() and "the main process failed" in str(err):  # the main process reports it, once
        sys.exit(EXIT_BUG)
    if callable(run_dir):
        run_dir = run_dir()
    where = ""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    for path in log_paths(run_dir):
        if not is_main():
            path = path.with_name(f"{path.stem}-rank{rank()}{path.suffix}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            where = f"; full traceback in {path}"
            break
        except OSError:
            continue
    first = (str(err).strip().splitlines() or [""])[0]
    line = f"prefopt: unexpected error (a bug, please report it): {type(err).__name__}: {first}"
    log = console.last_log()
    _append_to_log(line + where)
    click.echo(line + (f"; full log: {log}" if log is not None and Path(log).is_file() else "") + where, err=True)
    sys.exit(EXIT_BUG)


def _stopped(err: BaseException, what: str) -> None:
    """Ctrl-C, SIGTERM or a closed console pipe: say so (to the log file when the console is gone), exit 130 /
    143 / 141."""
    line = f"prefopt: {signals.words(err)}; {what}"
    _append_to_log(line)
    click.echo(line + _log_hint(), err=True)
    if console.closed():
        click.echo(f"prefopt: (the console closed: this run's output is in {console.console_log()})", err=True)
    sys.exit(signals.exit_code(err))


@contextlib.contextmanager
def _handled(run_dir=None, interrupted: str = "nothing more was written", keep_log=None, log_name: str = "run"):
    """A command's body: a user error -> one line, exit 2 (3 for a failed gate); a read-only folder, a full disk,
    permission denied -> one line, exit 2; Ctrl-C / SIGTERM / a closed pipe -> exit 130 / 143 / 141; anything else
    is a bug -> one line and a traceback log, exit 1. keep_log (a function giving a run folder or None): the
    command's log (console.captured) moves into that run folder's logs/ (a folder the run has not changed stays as
    it was: the log stays in the user cache)."""
    try:
        try:
            yield
        finally:
            if keep_log is not None:
                _keep_log(keep_log, log_name)
    except PrefoptError as e:
        _fail(e)
    except KeyboardInterrupt as e:
        _stopped(e, interrupted)
    except OSError as e:
        env = environment_error(e)
        if env is None:
            _bug(e, run_dir)
        _fail(env)
    except Exception as e:
        _bug(e, run_dir)


def _keep_log(run_dir, name: str = "run") -> None:
    target = run_dir() if callable(run_dir) else run_dir
    log = console.last_log()
    if log is None:
        return
    if is_main():
        console.SESSION["log"] = console.keep_log(log, target, name=name)
    elif target is not None:
        console.SESSION["log"] = console.keep_log(log, target, name=f"{name}-rank{rank()}")


def _log_hint() -> str:
    """'; full log: PATH' when a captured command wrote one (third-party output included)."""
    log = console.last_log()
    return f" (full log: {log})" if log is not None and Path(log).is_file() else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefopt")
@click.pass_context
def main(ctx) -> None:
    """prefopt: one YAML recipe chains SFT into DPO, ORPO or SimPO on a 4-bit DoRA base."""
    errors.SURFACE["cli"] = True  # messages name this command line's flags (not the API's keyword arguments)
    console.guard()  # a console pipe that closes (| tee, | head) stops a run gracefully, not with a traceback
    ctx.call_on_close(lambda: (errors.SURFACE.update(cli=False), signals.uninstall()))  # (in-process callers)


def _verbosity(quiet: bool, verbose: bool) -> int:
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose go one at a time")
    return console.QUIET if quiet else console.VERBOSE if verbose else console.NORMAL


_QUIET = click.option("--quiet", "-q", is_flag=True, help="Only the closing summary and errors on the console.")
_VERBOSE = click.option("--verbose", "-v", is_flag=True,
                        help="Everything on the console, third-party logs and warnings included (they always go to "
                        "the run's logs/run.log).")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. stages.dpo.beta=0.2 (a stage by name or index)")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Run folder (default runs/<name>/, or the run folder RECIPE belongs to when it is a run's "
              "recipe.yaml).")
@click.option("--fresh", is_flag=True, help="Start over: remove what prefopt wrote in the run folder (only in a "
              "prefopt run folder; other files are kept, a folder that is not one is refused).")
@click.option("--gpu-memory", default=None, metavar="SIZE",
              help="Refuse (exit 2, before any model loads) a stage whose planned peak exceeds SIZE (default: the "
              "visible GPU's memory; 'off' skips the check).")
@_QUIET
@_VERBOSE
def run(recipe: str, overrides: tuple[str, ...], output_dir: str | None, fresh: bool, gpu_memory: str | None,
        quiet: bool, verbose: bool) -> None:
    """Run every stage of RECIPE in order, resuming a previous run of it.

    The console shows prefopt's own lines, each stage's progress and a closing summary; everything else (every
    library's logs and warnings) goes to RUN_FOLDER/logs/run.log, the previous attempts' to run.1.log ... run.5.log."""
    signals.install()
    forget_committed()  # (an earlier run in this process, e.g. a test runner's, committed nothing of this one)
    level = _verbosity(quiet, verbose)
    # a bug's traceback goes to the run folder's logs/ only once this run has committed work there: a finished
    # folder stays byte-identical after a failure before that (else: the user's log folder)
    with _handled(_committed_run_dir, "finished stages and the last checkpoint are kept, re-run the same command "
                  "to resume", keep_log=_changed_run_dir):
        with console.captured("run", level):
            rec = load_checked(recipe, list(overrides))
            # a run folder's own recipe.yaml resumes that run folder (unless told otherwise)
            output_dir = output_dir or run_folder_of(recipe, rec.name)
            _check_memory(rec, gpu_memory)
            result = run_pipeline(rec, output_dir=output_dir, fresh=fresh, echo=console.say)
    if not is_main():  # one console under torchrun: the main process's
        return
    click.echo(render_status(run_status(result.run_dir), title=f"prefopt run {rec.name}: done", paths=False))
    for label, p in (("report", result.run_dir / runfolder.REPORT), ("merged", result.merged),
                     ("eval log", result.eval_log_path), ("run log", console.last_log())):
        if p is not None and Path(p).exists():
            click.echo(f"{label + ':':<10}{p}")


def _committed_run_dir():
    return COMMITTED["run_dir"]


def _changed_run_dir():
    """The run folder this run wrote to (its log joins it there), else None (the log stays in the user cache)."""
    return COMMITTED["run_dir"] if COMMITTED["changed"] else None


def _check_memory(rec, gpu_memory: str | None) -> None:
    """`prefopt run --gpu-memory`: a stage whose planned peak exceeds the device is refused before any model loads
    (on the visible GPU by default; on CPU only when SIZE is given). Not under a launcher: the plan of one process
    does not know the launcher's sharding (`prefopt plan --gpus N --sharding ...` does)."""
    if gpu_memory is not None and gpu_memory.strip().lower() == "off":
        return
    if world_size() > 1:
        return
    budget = parse_size(gpu_memory) if gpu_memory is not None else default_gpu_memory()
    if budget is None:
        return
    import torch

    try:
        plan_ = recipe_memory_plan(rec, gpu_memory=budget, device="cuda" if torch.cuda.is_available() else "cpu")
    except (PrefoptError, ValueError, ImportError):
        return  # a plan that cannot be made does not stop the run
    device = "" if torch.cuda.is_available() else " --device cpu"
    _refuse_unfit(plan_, budget, f"prefopt plan RECIPE --gpu-memory SIZE{device} shows what would fit; --gpu-memory "
                  "off skips this check")


def _refuse_unfit(plan_: dict, budget: int, how: str) -> None:

    unfit = [st for st in plan_["stages"] if st["fits"] is False]
    if unfit:
        raise PrefoptError("; ".join(f"stage {st['stage']}: planned peak {st['peak_bytes'] / 2**20:,.1f} MiB does not "
                                     f"fit {budget / 2**20:,.1f} MiB" for st in unfit) + f" ({how})")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="Values to try for a recipe key, e.g. stages.dpo.beta=0.05,0.1,0.3 (repeat for more keys: every "
              "combination is a point; KEY='[...]' for values holding commas). Added to the recipe's sweep: section.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Fix a recipe value on every point.")
@click.option("--select", default=None, metavar="METRIC[:min|:max]",
              help="The metric that marks the best point: eval/rewards/accuracies (the last stage that logs it), "
              "dpo/eval/loss, sft/train/loss, mmlu_delta, train_time_s (default: the last stage's eval/loss, min).")
@click.option("--max-points", type=click.IntRange(min=1), default=None,
              help="Refuse a grid of more points than this (default 64, or the recipe's sweep.max_points).")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="The sweep folder (default runs/<name>-sweep/): one run folder per point in it.")
@_QUIET
@_VERBOSE
def sweep(recipe: str, grid: tuple[str, ...], overrides: tuple[str, ...], select: str | None,
          max_points: int | None, output_dir: str | None, quiet: bool, verbose: bool) -> None:
    """Run RECIPE at every point of a grid, each point an ordinary run folder (runs/<name>-sweep/<point>/), and
    compare them: a table on the console, sweep.html and sweep.csv, the best point marked.

    RECIPE is a recipe (its grid from --grid or its sweep: section) or a sweep file (recipe:, grid:, select:,
    max_points:, set:). Stages with the same inputs in several points train once and are reused through the shared
    store. Every point is checked before the first starts. A rerun skips finished points and resumes an interrupted
    one; a failed point is reported and the others go on (exit 2 at the end, or 1 for a bug)."""
    signals.install()
    forget_committed()
    level = _verbosity(quiet, verbose)
    made: dict = {"root": None}  # the sweep folder, once every check passed (the log joins it there)
    with _handled(lambda: made["root"], "finished points and the last checkpoint are kept, re-run the same "
                  "command to resume", keep_log=lambda: made["root"], log_name="sweep"):
        with console.captured("sweep", level):
            spec = read_sweep_file(Path(recipe)) or SweepSpec(Path(recipe))
            spec.sets.update(parse_set_items(overrides))
            prep = prepare(spec, grid=list(grid), select=select, max_points=max_points, output_dir=output_dir)
            made["root"] = prep.root
            result = run_sweep(prep, echo=console.say)
        click.echo(f"prefopt sweep {prep.state['recipe_name']}: {len(result.rows)} points (* best)\n" + result.text())
        for label, p in (("table", result.html), ("csv", result.csv), ("sweep", prep.root / "sweep.json")):
            click.echo(f"{label + ':':<10}{p}")
        result.check()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--gpu-memory", default=None, metavar="SIZE",
              help="Memory of one device to check the plan against: 24GB, 24GiB, 80G or bytes (default: the visible "
              "GPU's, if any).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel devices, each with its own per-device batch.")
@click.option("--sharding", type=click.Choice(["none", "fsdp", "zero2"]), default="none", show_default=True,
              help="What the devices divide: none (DDP: each holds everything), zero2 (gradients and optimizer "
              "state), fsdp (the weights too); as recipes/accelerate/ configures them. ZeRO-3 is not modelled.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Plan for a GPU (bf16 autocast, as prefopt trains there) or for CPU training (the model's dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print the memory plan as JSON only (other messages on stderr).")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="The run folder `prefopt run` will write (default runs/<name>/): checked for writing and space.")
@click.option("--show-recipe", is_flag=True, help="Also print the resolved recipe (every default filled in).")
@_VERBOSE
def plan(recipe: str, overrides: tuple[str, ...], gpu_memory: str | None, gpus: int, sharding: str, device: str,
         as_json: bool, output_dir: str | None, show_recipe: bool, verbose: bool) -> None:
    """Validate RECIPE and show what `prefopt run` would do: stages, data sizes, trainable params, each stage's peak
    memory per device, by component, with settings that fit when it does not, and notes. Exit code 2 when anything
    would stop the run (a stage that does not fit --gpu-memory included), 0 otherwise."""
    with _handled():
        # third-party output (import-time notices included) goes to a log: stdout holds the plan (or JSON) alone
        with console.captured("plan", _verbosity(False, verbose)):
            rec = load_checked(recipe, list(overrides))
            budget = parse_size(gpu_memory) if gpu_memory is not None else default_gpu_memory()
            out_dir = runfolder.run_dir_of(rec.name, output_dir)
            if as_json:
                checked = preflight(rec, output_dir=out_dir)
                try:
                    plan_ = recipe_memory_plan(rec, gpu_memory=budget, gpus=gpus, device=device, sharding=sharding)
                except (PrefoptError, ValueError, ImportError) as e:  # as the text plan: the rest still stands
                    plan_ = {"stages": [], "error": f"memory plan unknown: {str(e).splitlines()[0]}"}
                out = {"recipe": rec.name, **plan_, "warnings": list(checked.warnings)}
                text = json.dumps(out, indent=1)
            else:
                text, plan_ = make_plan(rec, gpu_memory=budget, gpus=gpus, device=device, sharding=sharding,
                                        output_dir=out_dir, show_recipe=show_recipe)
        click.echo(text)
        if budget is not None and plan_:
            _refuse_unfit(plan_, budget, "the plan above shows any settings that would fit")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Run folder (default runs/<name>/); the reports go to its data/ folder.")
def data(recipe: str, overrides: tuple[str, ...], output_dir: str | None) -> None:
    """Run the data step of every stage of RECIPE without training: filters, counts, data_report.json and a review
    sample per stage in runs/<name>/data/ (loads no model unless a stage asks for the reference filter)."""
    with _handled(output_dir), console.captured("data"):
        rec = load_recipe(recipe, list(overrides))
        out = run_data_step(rec, output_dir=output_dir, echo=console.say)
    click.echo(f"data reports: {out}")


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--adapter", type=click.Path(file_okay=False), help="A PEFT adapter folder (instead of RUN_DIR).")
@click.option("--base", "base_model", default=None,
              help="Base model folder or hub id (default: as recorded in training).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default RUN_DIR/merged, with --stage RUN_DIR/merged-STAGE).")
@click.option("--stage", default=None,
              help="Merge this finished stage's adapter instead of the final one (a roll-back, with its own model "
                   "card and lineage.json). The evaluation's gates judge the final adapter only: they do not block "
                   "an earlier stage.")
@click.option("--merge-base", type=click.Choice(_choices(MergeSection, "base")), default=_MERGE["base"],
              show_default=True,
              help="Merge into the weights as the quantized training base saw them, or into the originals.")
@click.option("--quantization", type=click.Choice(_choices(ModelSection, "quantization")), default=None,
              help="Training base quantization (default: as recorded beside the adapter).")
@click.option("--dtype", type=click.Choice(_choices(MergeSection, "dtype")), default=_MERGE["dtype"],
              show_default=True, help=MergeSection.model_fields["dtype"].description)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-verify", is_flag=True, help="Skip comparing merged and adapter models.")
@click.option("--max-rel-logit-diff", type=float, default=_MERGE["max_rel_logit_diff"], show_default=True,
              help=MergeSection.model_fields["max_rel_logit_diff"].description)
@click.option("--mean-kl", type=float, default=_MERGE["mean_kl"], show_default=True,
              help=MergeSection.model_fields["mean_kl"].description)
@click.option("--min-top1-agreement", type=float, default=_MERGE["min_top1_agreement"], show_default=True,
              help=MergeSection.model_fields["min_top1_agreement"].description)
@click.option("--peft-forward/--no-peft-forward", default=None,
              help="Also run PEFT's DoRA forward in the verification, reported beside (default: auto, on for a base "
                   "under 1 GiB).")
@click.option("--ignore-gates", is_flag=True, help="Merge a run whose evaluation failed a gate (refused otherwise).")
def merge(run_dir, adapter, base_model, out, stage, merge_base, quantization, dtype, overwrite, no_verify,
          max_rel_logit_diff, mean_kl, min_top1_agreement, peft_forward, ignore_gates) -> None:
    """Merge an adapter into its base (streaming, DoRA-exact) and verify the merged model.

    RUN_DIR: the run's final adapter into RUN_DIR/merged/, or with --stage NAME that finished stage's adapter into
    RUN_DIR/merged-NAME/ (a roll-back). Either gets lineage.json beside the weights (data hashes -> adapter hashes ->
    merged hash) and a model card."""
    signals.install()  # SIGTERM as Ctrl-C: the half-written merge folder is removed on the way out
    with _handled(run_dir, "nothing was written to the output folder"), console.captured("merge"):
        kw = dict(base_mode=merge_base, out_dtype=dtype, overwrite=overwrite, verify_merge=not no_verify,
                  thresholds=Thresholds(max_rel_logit_diff, mean_kl, min_top1_agreement), peft_forward=peft_forward,
                  echo=console.say)
        if adapter and run_dir:
            raise PrefoptError("give RUN_DIR or --adapter, not both")
        if adapter:
            if not out:
                raise PrefoptError("--adapter needs --out DIR")
            if stage:
                raise PrefoptError("--stage goes with RUN_DIR (a stage of a run); --adapter names the adapter itself")
            merge_adapter(adapter, out, base=base_model, quantization=quantization, **kw)
        elif run_dir:
            if base_model or quantization:
                raise PrefoptError("--base/--quantization go with --adapter; a run folder records its base")
            merge_run(run_dir, out, ignore_gates=ignore_gates, stage=stage, **kw)
        else:
            raise PrefoptError("give a run folder (prefopt merge runs/NAME) or --adapter DIR --base MODEL --out DIR")



@main.command(name="eval")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a value of the run's recorded recipe, e.g. eval.mmlu.limit=50")
@click.option("--in-run", is_flag=True, hidden=True, help="The run's own evaluation, started by `prefopt run` under a "
              "launcher: an unchanged evaluation is not redone, and a failed gate withdraws an earlier merge.")
def eval_(run_dir: str, overrides: tuple[str, ...], in_run: bool) -> None:
    """(Re)run the evaluation of a finished run: held-out metrics, MMLU delta, completions, gates (exit code 3
    when a gate fails)."""
    with _handled(run_dir), console.captured("eval"):
        log = evaluate_existing(run_dir, list(overrides), echo=console.say, in_run=in_run)
    click.echo(describe(log))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--reviewer", default=None, help="Your name, recorded in the eval log.")
@click.option("--verdict", type=click.Choice(["approve", "reject"]), default=None, help="approve or reject the model.")
@click.option("--note", default=None, help="A note kept with the review.")
def review(run_dir: str, reviewer: str | None, verdict: str | None, note: str | None) -> None:
    """Show a run's completions and verdict, or sign it: --reviewer NAME --verdict approve|reject [--note TEXT]."""
    with _handled(run_dir):
        if (reviewer is None) != (verdict is None):
            raise PrefoptError("--reviewer and --verdict go together (or give neither, to read the run)")
        log = runfolder.read_eval_log(run_dir)
        if log is None:
            raise PrefoptError(f"{run_dir}: no eval/eval_log.json; evaluate the run first (prefopt eval {run_dir})")
        if reviewer is None:
            click.echo(_review_text(Path(run_dir), log))
            return
        entry = add_review(Path(run_dir), reviewer=reviewer, verdict=verdict, note=note)
        if (Path(run_dir) / runfolder.MERGED / runfolder.MERGE_REPORT).is_file():
            write_model_card(Path(run_dir) / runfolder.MERGED, Path(run_dir))
        build_report(run_dir)
    click.echo(f"review recorded: {entry['reviewer']} {entry['verdict']} at {entry['at']}")


def _review_text(run_dir, log: dict) -> str:
    out = []
    path = run_dir / runfolder.EVAL / "completions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    for r in rows:
        out += [f"--- {r['index'] + 1}/{len(rows)} " + "-" * 40, r["prompt"], "  [base]  " + r["base"],
                "  [tuned] " + r["tuned"]]
    out += ["", f"verdict: {describe(log)}"]
    out += [f"review: {r['at']} {r['reviewer']}: {r['verdict']}" + (f" ({r['note']})" if r.get("note") else "")
            + (" [stale: it read an earlier model]" if r.get("stale") else "")
            for r in log.get("reviews", [])] or ["reviews: none yet"]
    return "\n".join(out)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--root", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Where to look for run folders when RUN_DIR is not given.")
@click.option("--json", "as_json", is_flag=True, help="The status as JSON.")
def status(run_dir: str | None, root: str, as_json: bool) -> None:
    """Show RUN_DIR's state: each stage done / running / interrupted (resumable from step N) / failed (its error) /
    reused / not started, the evaluation's verdict, the merge, the last change. Without RUN_DIR: every run folder
    under runs/ in one line each. Exit code 2 for a path that is not a run folder."""
    with _handled():
        if run_dir is None:
            runs = list_runs(root)
            click.echo(json.dumps([r.to_dict() for r in runs], indent=1) if as_json else render_list(runs))
            return
        st = run_status(run_dir)
        click.echo(json.dumps(st.to_dict(), indent=1) if as_json else render_status(st, title=f"run {st.name}"))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report(run_dir: str) -> None:
    """Rebuild RUN_DIR/report.html from the run folder."""
    with _handled(run_dir):
        if runfolder.read_manifest(run_dir) is None:
            raise PrefoptError(f"{run_dir}: not a prefopt run folder (no run.json)")
        path = build_report(run_dir)
    click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    main()
