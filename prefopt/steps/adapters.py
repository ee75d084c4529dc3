"""A run folder's finished adapters, for a roll-back: pick a stage's (`prefopt merge RUN_DIR --stage NAME`,
`prefopt.load_adapter`) and load it on its base as the run did."""

from __future__ import annotations

from pathlib import Path

from ..config import load_recipe
from ..errors import RunFolderError
from ..models import ModelSpec, load_model
from ..runs import folder as runfolder


def finished_stage(run_dir: str | Path, stage: str | None = None, *, error=RunFolderError) -> tuple[dict, int, dict]:
    """(run.json, the stage's index, its entry) of a finished stage: `stage` by name, the last when None. A folder
    without run.json, an unknown stage or one not done (or whose adapter is missing) raises `error`, naming the
    stages there are."""
    run_dir = Path(run_dir)
    manifest = runfolder.read_manifest(run_dir)
    if not manifest or not manifest.get("stages"):
        raise error(f"{run_dir}: no run.json with stages; is this a prefopt run folder? (give the folder a run "
                    "wrote, e.g. runs/<recipe name>)")
    stages = manifest["stages"]
    names = [s["name"] for s in stages]
    done = [s["name"] for s in stages if s.get("status") == "done"
            and all((run_dir / s["adapter"] / f).is_file() for f in runfolder.ADAPTER_FILES)]
    if stage is not None and stage not in names:
        raise error(f"{run_dir}: no stage '{stage}'; its stages: "
                    + ", ".join(f"{s['name']} ({s.get('status')})" for s in stages))
    index = len(stages) - 1 if stage is None else names.index(stage)
    entry = stages[index]
    if entry["name"] not in done:
        what = entry.get("status") if entry.get("status") != "done" else "done but its adapter files are missing"
        rest = f"; or choose a finished stage: {', '.join(done)}" if done else ""
        last = "the last stage " if stage is None else "stage "
        raise error(f"{run_dir}: {last}'{entry['name']}' is {what}; finish the run first (prefopt run "
                    f"{run_dir / runfolder.RECIPE}){rest}")
    return manifest, index, entry


def load_adapter(run_dir: str | Path, stage: str | None = None, *, with_tokenizer: bool = False):
    """A finished stage's adapter on its base, as the run loaded it for its evaluation: the run's recipe.yaml says
    how the base is loaded (quantization, dtype, DoRA forward), a pissa/olora adapter's base is rewritten as in
    training. Returns the PeftModel in eval mode, or (model, tokenizer) with `with_tokenizer`."""
    manifest, _, entry = finished_stage(run_dir, stage)
    recipe_file = Path(run_dir) / runfolder.RECIPE
    if not recipe_file.is_file():
        raise RunFolderError(f"{run_dir}: no {runfolder.RECIPE}; it says how the base is loaded (a run folder "
                             "holds the recipe it ran)")
    recipe = load_recipe(recipe_file)
    _, model, tokenizer = load_model(ModelSpec.of(recipe), adapter=Path(run_dir) / entry["adapter"], trainable=False)
    return (model, tokenizer) if with_tokenizer else model
