"""Adapters as artefacts: every stage's adapter and the merged model carry their lineage (data files and hashes ->
stage inputs hash -> adapter hash -> merged hash, with the library versions) in run.json and beside the weights;
W&B (offline here) logs each as an artifact; `prefopt merge RUN --stage NAME` and `prefopt.load_adapter` roll back
to any finished stage. One tiny SFT -> DPO run (unquantized, W&B offline, merged) serves the module."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DEMO_DATA, chain_recipe, write_jsonl

import prefopt
from prefopt.cli import main
from prefopt.runs.folder import adapter_hash


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("lineage")
    data = {"sft": write_jsonl(root / "sft.jsonl", (DEMO_DATA / "sft.jsonl").read_text().splitlines()[:40]),
            "prefs": write_jsonl(root / "prefs.jsonl", (DEMO_DATA / "prefs.jsonl").read_text().splitlines()[:40])}
    raw = chain_recipe(tiny_model, data, "dpo", quantization="none", wandb="offline")
    raw.update(merge={"dtype": "float32"}, cache_dir=str(root / "store"))
    result = prefopt.run(prefopt.recipe_from_dict(raw), output_dir=root / "run", quiet=True)
    return result.run_dir


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _merged_hash(folder: Path) -> str:
    """The merged model's hash worked out here: each weight file and the config by sha256, then over the list."""
    names = sorted(p.name for p in folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    return hashlib.sha256("".join(f"{n}:{_sha256(folder / n)[:16]}\n" for n in names).encode()).hexdigest()[:16]


def test_each_adapter_and_the_merged_model_carry_their_lineage(run):
    manifest = _json(run / "run.json")
    sft, dpo = manifest["stages"]
    for entry in (sft, dpo):
        adapter = run / entry["adapter"]
        beside = _json(adapter / "lineage.json")
        assert entry["lineage"] == beside
        assert beside["adapter_hash"] == adapter_hash(adapter) and beside["inputs_hash"] == entry["inputs_hash"]
        assert beside["data"] and all(d["sha256"] == _sha256(d["path"]) for d in beside["data"])
        assert {lib: beside["versions"][lib] for lib in ("trl", "peft", "transformers", "torch")} == \
            {lib: version(lib) for lib in ("trl", "peft", "transformers", "torch")}
        assert beside["versions"]["prefopt"] == prefopt.__version__
        assert beside["trained_in"]["run_dir"] == str(run.resolve())
        assert beside["trained_in"]["run_id"] == manifest["run_id"]
    assert [Path(d["path"]).name for d in sft["lineage"]["data"]] == ["sft.jsonl"]
    assert sft["lineage"]["starts_from"] is None  # the base
    assert dpo["lineage"]["starts_from"] == {"stage": "sft", "adapter_hash": adapter_hash(run / sft["adapter"])}

    merged = _json(run / "merged" / "lineage.json")
    assert manifest["merge"]["lineage"] == merged
    assert merged["stages"] == [sft["lineage"], dpo["lineage"]]
    assert merged["adapter_hash"] == dpo["lineage"]["adapter_hash"] == _json(run / "merged/merge_report.json")[
        "adapter_hash"]
    assert merged["merged_hash"] == _merged_hash(run / "merged")
    assert merged["merge"]["verified"] is True


def test_a_kept_or_reused_stage_keeps_its_record(run, tmp_path):
    """A rerun skips every stage and writes nothing; another folder reuses both stages from the shared store, and
    their records still name the run they were trained in; a stage that lost its record gets one, saying so."""
    before = (run / "run.json").read_text()
    recipe = prefopt.load_recipe(run / "recipe.yaml")
    prefopt.run(recipe, output_dir=run, quiet=True)
    assert (run / "run.json").read_text() == before

    other = prefopt.run(recipe, output_dir=tmp_path / "other", quiet=True).run_dir
    original = _json(run / "run.json")["stages"]
    for entry, first in zip(_json(other / "run.json")["stages"], original):
        assert entry["reused_from"] and entry["lineage"] == first["lineage"]
        assert _json(other / entry["adapter"] / "lineage.json")["trained_in"]["run_dir"] == str(run.resolve())

    (other / original[0]["adapter"] / "lineage.json").unlink()
    prefopt.run(recipe, output_dir=other, quiet=True)
    again = _json(other / "run.json")["stages"][0]["lineage"]
    assert again == _json(other / original[0]["adapter"] / "lineage.json")
    assert "recorded after training" in again["note"] and again["versions"] is None
    assert again["adapter_hash"] == original[0]["lineage"]["adapter_hash"]


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B run as its records: name, job type, the artifacts it logged (name, type, digest, metadata,
    files), its prefopt/inputs config and whether it holds any use-artifact record. wandb's service writes the .wandb
    file asynchronously (tests/test_tracking.py): wait (up to 30 s) for the run's exit record."""
    from wandb.proto import wandb_internal_pb2 as pb

    def records(blob: bytes):
        pos, buf, block = 7, b"", 32768  # leveldb-log framing: a 7-byte file header, then 7-byte record headers
        while pos + 7 <= len(blob):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            length, kind = int.from_bytes(blob[pos + 4:pos + 6], "little"), blob[pos + 6]
            if not length and not kind:
                break
            buf += blob[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                rec = pb.Record()
                rec.ParseFromString(buf)
                yield rec
                buf = b""

    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        deadline = time.monotonic() + 30
        while True:
            recs = list(records(next(d.glob("run-*.wandb")).read_bytes()))
            if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        info = {"artifacts": [], "inputs": None, "uses": 0}
        for r in recs:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info.update(name=r.run.display_name, job_type=r.run.job_type, group=r.run.run_group)
            elif kind == "artifact":
                a = r.artifact
                info["artifacts"].append({"name": a.name, "type": a.type, "digest": a.digest,
                                          "metadata": json.loads(a.metadata or "{}"),
                                          "files": sorted(e.path for e in a.manifest.contents)})
            elif kind == "config":
                info["inputs"] = next((json.loads(u.value_json) for u in r.config.update
                                       if u.key == "prefopt/inputs"), info["inputs"])
            elif kind == "use_artifact":
                info["uses"] += 1
        out.append(info)
    return out


def test_wandb_offline_logs_each_artefact_with_its_lineage_and_inputs(run):
    manifest = _json(run / "run.json")
    runs = {r["name"]: r for r in _wandb_runs(run)}
    assert set(runs) == {"chain/sft", "chain/dpo", "chain/merge"}
    assert {r["group"] for r in runs.values()} == {f"chain-{manifest['run_id']}"}
    (sft,), (dpo,), (model,) = (runs[f"chain/{n}"]["artifacts"] for n in ("sft", "dpo", "merge"))
    for art, entry in ((sft, manifest["stages"][0]), (dpo, manifest["stages"][1])):
        assert art["type"] == "adapter" and art["metadata"] == entry["lineage"]
        assert art["files"] == ["adapter_config.json", "adapter_model.safetensors", "lineage.json"]
    assert (model["name"], model["type"]) == ("chain-merged", "model")
    assert model["metadata"] == _json(run / "merged" / "lineage.json")
    assert "lineage.json" in model["files"] and not any(f.endswith(".safetensors") for f in model["files"])
    # the inputs each run would use online, by content: data -> sft adapter -> dpo adapter -> merged model
    assert [(i["type"], i["name"]) for i in runs["chain/sft"]["inputs"]] == [("dataset", "data-sft.jsonl")]
    assert runs["chain/dpo"]["inputs"][1] == {"type": "adapter", "name": sft["name"], "digest": sft["digest"]}
    assert runs["chain/merge"]["inputs"] == [{"type": "adapter", "name": dpo["name"], "digest": dpo["digest"]}]
    # wandb refuses use_artifact offline: the edges themselves are drawn only by an online run (next test)
    assert not any(r["uses"] for r in runs.values())


def test_an_online_stage_run_uses_its_data_and_the_adapter_it_started_from(run, monkeypatch):
    """The online branch, on a stand-in run: the DPO stage uses its data file and the SFT adapter as drafts whose
    digest is the one the SFT stage logged (W&B then links that version)."""
    import wandb

    from prefopt.config import WandbSection
    from prefopt.steps.lineage import adapter_artifact
    from prefopt.tracking import log_adapter

    class OnlineRun:  # what prefopt.tracking reads and calls of a wandb run
        offline = False

        def __init__(self):
            self.inputs, self.used, self.logged = None, [], []
            self.config = self

        def update(self, values, allow_val_change=False):
            self.inputs = values["prefopt/inputs"]

        def use_artifact(self, art):
            self.used.append(art)

        def log_artifact(self, art):
            self.logged.append(art)

    fake = OnlineRun()
    monkeypatch.setattr(wandb, "run", fake)
    stages = _json(run / "run.json")["stages"]
    lineage = stages[1]["lineage"]
    log_adapter(WandbSection(mode="online"), **dict(zip(("name", "files"), adapter_artifact(
        "chain", "dpo", run / stages[1]["adapter"]))), lineage=lineage, data=lineage["data"],
        previous=adapter_artifact("chain", "sft", run / stages[0]["adapter"]))
    sft_logged = next(a for a in _wandb_runs(run) if a["name"] == "chain/sft")["artifacts"][0]
    assert [(a.type, a.name) for a in fake.used] == [("dataset", "data-prefs.jsonl"), ("adapter", "chain-sft-adapter")]
    assert fake.used[1].digest == sft_logged["digest"]
    assert fake.inputs == [{"type": a.type, "name": a.name, "digest": a.digest} for a in fake.used]
    assert [(a.type, a.name, a.metadata) for a in fake.logged] == [("adapter", "chain-dpo-adapter", lineage)]


def test_merge_a_stage_through_the_cli(run, tmp_path):
    """`prefopt merge RUN --stage sft` in a copy of the run whose evaluation failed a gate: the final adapter is
    refused, the SFT stage merges (verified, its own card and lineage); a bad or unfinished stage exits 2."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("wandb", "merged"))
    manifest = _json(copy / "run.json")
    (copy / "eval").mkdir()
    gate = {"name": "min_reward_accuracy", "what": "held-out reward accuracy (dpo)", "threshold": 0.9,
            "limit": ">= 0.9", "value": 0.5, "verdict": "fail"}
    (copy / "eval" / "eval_log.json").write_text(json.dumps({
        "adapter_hash": adapter_hash(copy / manifest["stages"][1]["adapter"]), "final_stage": "dpo",
        "gates": [gate], "passed": False, "heldout": {"dpo": {"reward_accuracy": 0.5}}}))
    cli = CliRunner()
    refused = cli.invoke(main, ["merge", str(copy), "--dtype", "float32"])
    assert refused.exit_code == 3 and "--stage NAME" in refused.output
    done = cli.invoke(main, ["merge", str(copy), "--stage", "sft", "--dtype", "float32"])
    assert done.exit_code == 0, done.output
    out = copy / "merged-sft"
    assert _json(out / "merge_report.json")["verification"]["passed"]
    card = (out / "README.md").read_text()
    assert "Stage `sft` of this run" in card and "0.5" not in card.split("## Recipe")[0]  # not the DPO figures
    lineage = _json(out / "lineage.json")
    assert lineage["stage"] == "sft" and lineage["stages"] == [manifest["stages"][0]["lineage"]]
    assert lineage["adapter_hash"] == adapter_hash(copy / manifest["stages"][0]["adapter"])
    assert lineage["merged_hash"] == _merged_hash(out)
    runs = sorted((copy / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # the merge's own W&B run
    again = cli.invoke(main, ["merge", str(copy), "--stage", "sft", "--dtype", "float32"])
    assert again.exit_code == 0 and "is current" in again.output  # nothing merged, recorded or logged again
    assert _json(out / "lineage.json") == lineage and sorted((copy / "wandb").glob("offline-run-*")) == runs

    bad = cli.invoke(main, ["merge", str(copy), "--stage", "rm"])
    assert bad.exit_code == 2 and "no stage 'rm'; its stages: sft (done), dpo (done)" in bad.output
    manifest["stages"][1]["status"] = "failed"
    (copy / "run.json").write_text(json.dumps(manifest))
    unfinished = cli.invoke(main, ["merge", str(copy), "--stage", "dpo"])
    assert unfinished.exit_code == 2 and "stage 'dpo' is failed" in unfinished.output
    assert "choose a finished stage: sft" in unfinished.output and "Traceback" not in unfinished.output


def test_load_adapter_returns_the_stage_model_the_run_trained(run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = _json(run / "run.json")
    base_path = prefopt.load_recipe(run / "recipe.yaml").model_path()
    model, tokenizer = prefopt.load_adapter(run, stage="sft", with_tokenizer=True)
    final = prefopt.load_adapter(run)  # the last stage
    assert isinstance(model, PeftModel) and not model.training and tokenizer.chat_template
    batch = tokenizer(["The adapter under test", "a second prompt"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, got_final = model(**batch).logits, final(**batch).logits
        for entry, logits in zip(manifest["stages"], (got, got_final)):
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            want = PeftModel.from_pretrained(base, str(run / entry["adapter"])).eval()(**batch).logits
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, got_final, atol=1e-3)  # two different adapters
    with pytest.raises(prefopt.PrefoptError, match="no stage 'rm'; its stages: sft"):
        prefopt.load_adapter(run, stage="rm")
    with pytest.raises(prefopt.PrefoptError, match="no run.json"):
        prefopt.load_adapter(run / "stages")
