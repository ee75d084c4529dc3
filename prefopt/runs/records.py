"""A run's records (run.json, recipe.yaml), written only once new work is committed.

A run that fails before it commits anything leaves its folder byte-identical. Commit points: a stage that has loaded
its model and starts training, a stage reused from the shared store, a new evaluation or merge, and the end of a
successful run. run.json then lists the stages the run has reached, followed by the stages it has not reached yet as
the previous run recorded them (a failure in stage 1 leaves stage 2's record alone).
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from pathlib import Path

from .. import dist
from ..version import __version__
from . import folder as runfolder

# the run folder this process has committed work to (bug logs may go there), and whether it wrote anything there (the
# command's log then goes there too: a rerun that changes nothing leaves the folder as it was)
COMMITTED: dict = {"run_dir": None, "changed": False}


def forget_committed() -> None:
    """A new run in this process: nothing committed yet."""
    COMMITTED.update(run_dir=None, changed=False)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_run_folder(recipe, run_dir: Path, fresh: bool) -> tuple[dict, dict]:
    """The main process reads the run folder (writes nothing): the new manifest, and the old stages by name."""
    old = {} if fresh else (runfolder.read_manifest(run_dir) or {})
    manifest = {
        "prefopt_version": __version__,
        "recipe_name": recipe.name,
        "recipe_hash": recipe.section_hash(recipe.to_dict()),
        "run_id": old.get("run_id") or uuid.uuid4().hex[:12],
        "created_at": old.get("created_at") or now(),
        "stages": [],
    }
    for key in ("eval", "merge"):
        if old.get(key):
            manifest[key] = old[key]
    return manifest, {s["name"]: s for s in old.get("stages", [])}


class Records:
    """The run folder's records. Until `commit()`, `save()` writes nothing; `manifest` is the run.json being built
    and `old_stages` the previous run's stage entries by name."""

    def __init__(self, recipe, run_dir: Path, fresh: bool, manifest: dict, old_stages: dict, echo):
        self.recipe, self.run_dir, self.fresh = recipe, run_dir, fresh
        self.manifest, self.old_stages, self.echo = manifest, old_stages, echo
        self.committed = False
        self.changed = False  # something was written

    @classmethod
    def open(cls, recipe, run_dir: Path, fresh: bool, echo) -> Records:
        """The records of `run_dir` as the main process reads them, the same on every rank."""
        manifest, old_stages = dist.on_main_then_share(read_run_folder, recipe, run_dir, fresh)
        return cls(recipe, run_dir, fresh, manifest, old_stages, echo)

    def current(self) -> dict:
        reached = {e["name"] for e in self.manifest["stages"]}
        rest = [self.old_stages[s.name] for s in self.recipe.stages
                if s.name not in reached and s.name in self.old_stages]
        return {**self.manifest, "stages": self.manifest["stages"] + rest}

    def commit(self) -> None:
        """New work is about to be (or was) written: prepare the folder once, then keep the records current."""
        if not dist.is_main():
            return
        if not self.committed:
            self.committed = True
            COMMITTED["run_dir"] = self.run_dir
            self._prepare_folder()
        self.save()
        COMMITTED["changed"] = COMMITTED["changed"] or self.changed

    def _prepare_folder(self) -> None:
        run_dir = self.run_dir
        if self.fresh:
            runfolder.clear_for_fresh(run_dir)
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        for name in runfolder.clean_temp(run_dir):
            self.echo(f"prefopt: removed {name}, left behind by an interrupted run")
        # run.json first, so the folder is recognisably a prefopt run folder from here on
        self.changed |= runfolder.write_if_changed(run_dir / runfolder.MANIFEST, self._manifest_text())
        self.changed |= runfolder.write_if_changed(run_dir / runfolder.RECIPE, self.recipe.to_yaml())
        # Stages dropped from the recipe since the last run leave run.json (above) and stages/.
        keep = {self.recipe.stage_dirname(i) for i in range(len(self.recipe.stages))}
        for name in runfolder.move_dropped_stages(run_dir, keep):
            self.changed = True
            self.echo(f"prefopt: stage folder {name} is not in the recipe any more; moved to dropped/{name}")

    def save(self, commit: bool = False) -> None:
        if commit:
            self.commit()
        elif dist.is_main() and self.committed:
            self.changed |= runfolder.write_if_changed(self.run_dir / runfolder.MANIFEST, self._manifest_text())
            COMMITTED["changed"] = COMMITTED["changed"] or self.changed

    def _manifest_text(self) -> str:
        old = runfolder.read_manifest(self.run_dir)
        if old is not None and _same_records(old, self.current()):
            return (self.run_dir / runfolder.MANIFEST).read_text()  # the same records: the file as it is
        return json.dumps(self.current(), indent=2)


def _same_records(a: dict, b: dict) -> bool:
    """Two manifests that say the same (key order aside)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def data_entry(report: dict) -> dict:
    """run.json's summary of a stage's data report."""
    return {"input_rows": report["input_rows"], "train_rows": report["train_rows"], "eval_rows": report["eval_rows"],
            "dropped": {k: v for k, v in report["dropped"].items() if v},
            **({"labels": report["labels"]} if report.get("labels") else {})}
