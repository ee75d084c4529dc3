"""Weights & Biases: one run per stage, grouped under the recipe run; a no-op when disabled.

transformers' WandbCallback picks up the run we open (it only calls wandb.init when none is active),
so the trainer's own logging lands in the stage's run. No API key is ever written by prefopt: wandb
reads it from its own login or WANDB_API_KEY, and offline runs need none.

Precedence: WANDB_MODE in the environment (online, offline, disabled; wandb's dryrun = offline, run = online)
overrides the recipe's tracking.wandb.mode; WANDB_DISABLED=true means disabled.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .dist import is_main

_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def effective_mode(recipe_mode: str) -> tuple[str, str]:
    """(mode, "env" | "recipe"): the environment's WANDB_MODE wins over the recipe."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "env"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in _ENV_MODES:
        return _ENV_MODES[env], "env"
    return recipe_mode, "recipe"


def group_of(wandb_cfg, recipe_name: str, run_id: str) -> str:
    """The W&B group of a run's stages, evaluation and merge: tracking.wandb.group, else <name>-<run id>."""
    return wandb_cfg.group or f"{recipe_name}-{run_id}"


def _init(wandb_cfg, mode: str, *, run_dir: Path, group: str, name: str, job_type: str, config: dict | None = None):
    """A W&B run in the recipe's project and group, its files in the run folder, quiet (no console capture, no
    system stats, no code saved); an earlier run of this process is finished first."""
    import wandb

    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=group, name=name, job_type=job_type,
                      config=config, tags=list(wandb_cfg.tags) or None, mode=mode, dir=str(run_dir),
                      reinit="finish_previous",
                      settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True))


def has_credentials() -> bool:
    """An API key wandb would find: WANDB_API_KEY, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    for name in filter(None, [os.environ.get("NETRC"), str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]):
        try:
            if netrc.netrc(name).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


@contextlib.contextmanager
def stage_run(wandb_cfg, *, run_dir: Path, group: str, name: str, job_type: str, config: dict):
    """Yields the trainer's `report_to` list and a function to log a summary dict.

    The W&B run ends with exit code 0 only when the stage finished; an exception or interrupt inside the
    stage is recorded with a non-zero exit code (1, or 130 for an interrupt) before it propagates."""

    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled" or not is_main():  # under torchrun, one W&B run per stage: the main process's
        yield [], (lambda summary: None)
        return

    run = _init(wandb_cfg, mode, run_dir=run_dir, group=group, name=name, job_type=job_type, config=config)

    def log_summary(summary: dict) -> None:
        for section, values in summary.items():
            for k, v in (values or {}).items():
                if isinstance(v, (int, float)):
                    run.summary[f"final/{section}/{k}"] = v

    exit_code = 1
    try:
        yield ["wandb"], log_summary
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130
        run.summary["prefopt/status"] = "interrupted"
        raise
    except BaseException:
        run.summary["prefopt/status"] = "failed"
        raise
    finally:
        run.finish(exit_code=exit_code)


def log_sweep(wandb_cfg, *, run_dir: Path, group: str, name: str, columns: list[str], rows: list[list],
              best: str | None) -> None:
    """A sweep's comparison table as a W&B run of its own (job_type sweep) in the sweep's group, beside its points'
    stage runs: the table, and the best point in the summary."""
    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled" or not is_main():
        return
    import wandb

    run = _init(wandb_cfg, mode, run_dir=run_dir, group=group, name=name, job_type="sweep")
    try:
        run.log({"sweep": wandb.Table(columns=columns, data=rows)})
        run.summary["sweep/points"] = len(rows)
        if best is not None:
            run.summary["sweep/best"] = best
    finally:
        run.finish()


def log_eval(wandb_cfg, *, run_dir: Path, group: str, name: str, log: dict, completions: list[dict]) -> None:
    """The evaluation as its own W&B run in the recipe's group: the figures in the summary, the completions as a
    table (prompt, base, tuned)."""
    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled":
        return
    import wandb

    run = _init(wandb_cfg, mode, run_dir=run_dir, group=group, name=name, job_type="eval")
    try:
        m = log.get("mmlu") or {}
        if m:
            run.summary.update({"mmlu/base_acc": m["base"]["acc"], "mmlu/tuned_acc": m["tuned"]["acc"],
                                "mmlu/delta_points": m["delta_points"], "mmlu/paired_stderr": m["paired_stderr"]})
        for stage, values in (log.get("heldout") or {}).items():
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    run.summary[f"heldout/{stage}/{k}"] = v
        run.summary["eval/passed"] = bool(log.get("passed"))
        if completions:
            table = wandb.Table(columns=["index", "prompt", "base", "tuned"],
                                data=[[c["index"], c["prompt"], c["base"], c["tuned"]] for c in completions])
            run.log({"completions": table})
    finally:
        run.finish()


# ---------------------------------------------------------------------------------------------- artifacts (lineage)
# Each stage's run logs its adapter (type adapter: weights, adapter config, lineage.json; metadata = the lineage
# record) and uses its data files (type dataset: a reference to the file, its sha256 in the metadata) and the adapter
# it started from; the merge's run logs the merged model's metadata (type model: lineage.json, merge_report.json,
# the model card, config.json; not the weights) and uses the adapter it merged. W&B draws data -> adapter -> adapter
# -> model from the uses. Artifacts are given as values: (name, files) and metadata dicts.


def artifact_name(*parts: str) -> str:
    """A W&B artifact name from parts joined by '-': letters, digits, '-', '_' and '.' only."""
    import re

    return re.sub(r"[^\w.-]+", "-", "-".join(parts)).strip("-.")[:128]


def _files_artifact(name: str, type_: str, files: list[Path], metadata: dict | None = None):
    import wandb

    art = wandb.Artifact(name, type=type_, metadata=metadata)
    for f in files:
        art.add_file(str(f), name=Path(f).name)
    return art


def _dataset_artifact(entry: dict):
    """A data file ({role, path, sha256}) as a dataset artifact: a reference to the local file (W&B records its
    checksum; nothing is uploaded), or to the hub id."""
    import wandb

    path = Path(entry["path"])
    art = wandb.Artifact(artifact_name("data", path.name), type="dataset",
                         metadata={"path": entry["path"], "sha256": entry["sha256"]})
    if path.is_file():
        art.add_reference(path.resolve().as_uri(), checksum=True)
    else:
        art.add_reference(f"hf://datasets/{entry['path']}", name=entry["path"], checksum=False)
    return art


def use_inputs(run, inputs: list) -> None:
    """Record the run's input artifacts: in its config (prefopt/inputs: type, name, digest) always, and as uses
    (W&B's lineage edges) when the run is online: each draft is used as it is -- W&B logs it, or, when a version with
    the same content exists (the one the previous stage logged), links that version. An offline run cannot use an
    artifact: wandb refuses use_artifact offline (0.31: TypeError 'Cannot use artifact when in offline mode', for a
    name and an Artifact object alike), so its edges are not drawn when it is synced; the config and each artifact's
    lineage metadata still name its inputs by content."""
    run.config.update({"prefopt/inputs": [{"type": a.type, "name": a.name, "digest": a.digest} for a in inputs]},
                      allow_val_change=True)
    if not run.offline:
        for art in inputs:
            run.use_artifact(art)


def log_adapter(wandb_cfg, *, name: str, files: list[Path], lineage: dict, data: list[dict],
                previous: tuple[str, list[Path]] | None) -> None:
    """A stage's adapter as an artifact of the stage's W&B run (the active one: call inside stage_run), which uses
    the stage's data files and the adapter it started from (`previous`: its artifact name and files)."""
    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled" or not is_main():
        return
    import wandb

    if wandb.run is None:
        return
    inputs = [_dataset_artifact(d) for d in data]
    if previous is not None:
        inputs.append(_files_artifact(previous[0], "adapter", previous[1]))
    use_inputs(wandb.run, inputs)
    wandb.run.log_artifact(_files_artifact(name, "adapter", files, lineage))


def log_merged(wandb_cfg, *, run_dir: Path, group: str, name: str, artifact: str, files: list[Path], lineage: dict,
               adapter: tuple[str, list[Path]]) -> None:
    """A merged model as a W&B run of its own (job_type merge) in the run's group: its metadata files as a model
    artifact (not the weights: lineage.json records their hashes), using the adapter it merged."""
    mode, _ = effective_mode(wandb_cfg.mode)
    if mode == "disabled" or not is_main():
        return

    run = _init(wandb_cfg, mode, run_dir=run_dir, group=group, name=name, job_type="merge")
    try:
        use_inputs(run, [_files_artifact(adapter[0], "adapter", adapter[1])])
        run.log_artifact(_files_artifact(artifact, "model", files, lineage))
        run.summary["merge/merged_hash"] = lineage.get("merged_hash")
    finally:
        run.finish()
