"""Issue 24's methods through the real chain (CPU, tiny model, real TRL trainers): KTO on unpaired feedback and on
split pairs, multi-loss DPO, adapter inits; and prefopt's tables of TRL's choices against the installed TRL."""

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, FAST_TRAIN, chain_recipe, write_jsonl

import prefopt
from prefopt import recipe_from_dict
from prefopt.config import KTOStage
from prefopt.data import prepare_stage

LN2 = math.log(2)


def history(run_dir: Path, stage_dir: str) -> list[dict]:
    return json.loads((run_dir / "stages" / stage_dir / "log_history.json").read_text())


def first_step(run_dir: Path, stage_dir: str) -> dict:
    return next(h for h in history(run_dir, stage_dir) if "loss" in h)


@pytest.fixture()
def feedback(tmp_path) -> Path:
    """64 unpaired rows of the shipped demo feedback (about a third desirable)."""
    return write_jsonl(tmp_path / "feedback.jsonl", (DEMO_DATA / "feedback.jsonl").read_text().splitlines()[:64])


def kto_recipe(tiny_model, small_data, feedback, **kto) -> dict:
    raw = chain_recipe(tiny_model, small_data, None)
    raw["stages"].append({"name": "kto", "type": "kto", "data": {"path": str(feedback), "eval_fraction": 0.2},
                          "train": dict(FAST_TRAIN, learning_rate=1e-3), **kto})
    return raw


# ---------------------------------------------------------------------------------------------- tables


def _branches(fn, attr: str) -> set[str]:
    return set(re.findall(rf'{attr} == "(\w+)"', inspect.getsource(fn)))


def test_tables_match_the_installed_trl():
    """prefopt's tables of TRL's choices are read from TRL's own code, not its help text: an upgrade that adds or
    drops a loss or a divergence fails here."""
    from trl import DPOTrainer, KTOTrainer

    from prefopt.stages import dpo, kto

    assert _branches(DPOTrainer._compute_loss, "loss_type") == set(dpo.LOSS_TYPES)
    assert _branches(DPOTrainer._compute_loss, "self.f_divergence_type") == set(dpo.F_DIVERGENCES)
    init = inspect.getsource(DPOTrainer.__init__)
    allowed = re.search(r"f_divergence_loss_types = \{([^}]*)\}", init).group(1)
    assert set(re.findall(r'"(\w+)"', allowed)) == set(dpo.F_DIVERGENCE_LOSSES)
    assert set(re.findall(r'loss_type in \{([^}]*)\}', init)[0].replace('"', "").replace(" ", "").split(",")) \
        == set(dpo.NO_WEIGHTING)
    assert _branches(KTOTrainer._compute_loss, "self.loss_type") == set(kto.LOSS_TYPES)
    assert set(KTOStage.model_fields["loss_type"].annotation.__args__) == set(kto.LOSS_TYPES)


# ---------------------------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("reference", ["previous_stage", "base"])
def test_sft_then_kto_reference_and_merge(tmp_path, tiny_model, small_data, feedback, reference, capsys):
    raw = kto_recipe(tiny_model, small_data, feedback, reference=reference)
    raw["merge"] = {"verify": True}
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run")
    step0 = first_step(result.run_dir, "01-kto")
    # (a batch of 4 may hold one label only: TRL logs the rewards of the labels it saw)
    rewards = [step0[k] for k in ("rewards/chosen", "rewards/rejected") if k in step0]
    assert rewards and "kl" in step0, step0
    if reference == "previous_stage":  # the reference IS the SFT model at the first step: every figure 0
        assert all(abs(v) < 1e-6 for v in rewards + [step0["kl"]]), step0
    else:  # the base is not the SFT model
        assert all(abs(v) > 1e-4 for v in rewards) and step0["kl"] > 1e-4, step0
    manifest = json.loads((result.run_dir / "run.json").read_text())
    entry = manifest["stages"][1]
    assert entry["reference"] == reference and entry["ref_logps"]["cache"] == "miss"
    labels = entry["metrics"]["labels"]
    good, bad = labels["desirable"], labels["undesirable"]
    assert 0 < good < bad and labels["weights"] == "balanced"
    ratio = labels["desirable_weight"] * good / (labels["undesirable_weight"] * bad)
    assert 1.0 <= ratio <= 4 / 3  # KTO paper eq. 8, TRL's recommended range
    assert f"{good} desirable, {bad} undesirable training rows" in capsys.readouterr().err
    assert result.merge_report["verification"]["passed"], result.merge_report
    # the reference log-probs come from prefopt's cache on a rerun with another beta
    raw["stages"][1]["beta"] = 0.2
    again = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run2")
    assert json.loads((again.run_dir / "run.json").read_text())["stages"][1]["ref_logps"]["cache"] == "hit"


def test_kto_on_a_paired_file_splits_the_pairs(small_data):
    stage = KTOStage(name="kto", data={"path": str(small_data["prefs"]), "eval_fraction": 0.25})
    data = prepare_stage(stage, seed=0)
    labels = data.report["labels"]
    pairs = labels["train"]["pairs_split"] + labels["eval"]["pairs_split"]
    assert pairs == 40 and data.report["input_rows"] == 40
    assert labels["train"]["desirable"] == labels["train"]["undesirable"] == labels["train"]["pairs_split"]
    assert len(data.train) == 2 * labels["train"]["pairs_split"]
    # both halves of every pair on the same side of the split, and not side by side (KTOTrainer reads in order)
    assert labels["eval"]["desirable"] == labels["eval"]["undesirable"] == labels["eval"]["pairs_split"] > 0
    assert len(data.eval) == 2 * labels["eval"]["pairs_split"]
    assert any(data.train[k]["prompt"] != data.train[k + 1]["prompt"] for k in range(0, len(data.train) - 1, 2))
    assert set(data.train.column_names) == {"prompt", "completion", "label"}


# ---------------------------------------------------------------------------------------------- multi-loss DPO


def test_multi_loss_dpo_trains_and_logs_each_part(tmp_path, tiny_model, small_data):
    raw = chain_recipe(tiny_model, small_data, "dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run")
    step0 = first_step(result.run_dir, "01-dpo")
    assert step0["loss/sigmoid"] == pytest.approx(LN2, abs=1e-4)  # policy == reference at the first step
    assert step0["loss/sft"] > 1.0  # the SFT term: the chosen answers' mean token NLL
    assert step0["loss"] == pytest.approx(step0["loss/sigmoid"] + 0.5 * step0["loss/sft"], rel=1e-4)
    ev = result.metrics["dpo"]["eval"]
    assert "eval_loss/sft" in ev and "eval_loss/sigmoid" in ev


# ---------------------------------------------------------------------------------------------- adapter inits


def test_gaussian_and_eva_inits_start_at_the_base(tmp_path, tiny_model, small_data):
    from prefopt.models import ModelSpec, build_lora_config, load_model

    spec = ModelSpec(str(tiny_model), "none", "float32")
    rows = [json.loads(x) for x in small_data["sft"].read_text().splitlines()]
    base, _, tok = load_model(spec, build_lora_config(r=8, alpha=16))
    ids = torch.tensor([tok("Tell me about the sea. The sea is kind.")["input_ids"]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    a = {}
    for init in ("kaiming", "gaussian", "eva"):
        _, model, _ = load_model(spec, build_lora_config(r=8, alpha=16, init=init), init_rows=rows)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5), init  # B = 0: the base exactly
        a[init] = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach()
    assert a["gaussian"].std().item() == pytest.approx(1 / 8, rel=0.2)  # PEFT's gaussian: std 1/r
    assert torch.allclose(a["eva"].norm(dim=1), torch.ones(8), atol=1e-4)  # EVA: singular vectors of the inputs
    assert not torch.allclose(a["kaiming"].norm(dim=1), torch.ones(8), atol=1e-2)


def test_pissa_chain_rebuilds_the_rewritten_base_everywhere(tmp_path, tiny_model, small_data):
    """PiSSA moves W's top singular directions into the adapter: every stage, the evaluation's base view and the
    merge must use the rewritten base W - s*B0*A0, and the adapter disabled is not the base."""
    from prefopt.models import ModelSpec, base_view, load_base_model, load_model

    raw = chain_recipe(tiny_model, small_data, "dpo", quantization="none")
    raw["adapter"]["init"] = "pissa"
    raw["merge"] = {"verify": True}
    result = prefopt.run(recipe_from_dict(raw), output_dir=tmp_path / "run")
    assert first_step(result.run_dir, "01-dpo")["loss"] == pytest.approx(LN2, abs=1e-4)
    for name in ("sft", "dpo"):
        assert (result.adapters[name] / "init_adapter" / "adapter_config.json").is_file()
    spec = ModelSpec(str(tiny_model), "none", "float32")
    _, model, tok = load_model(spec, adapter=result.adapters["dpo"], trainable=False)
    base = load_base_model(str(tiny_model), quantization="none", dtype="float32")
    ids = torch.tensor([tok("Tell me about the sea. The sea is kind.")["input_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with base_view(model):
            viewed = model(input_ids=ids).logits
        with model.disable_adapter():
            residual = model(input_ids=ids).logits
        want = base(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, tuned), "the base view leaves the model as it was"
    assert (viewed - want).abs().max() < 1e-4
    assert (residual - want).abs().max() > 1e-2, "the adapter disabled is the rewritten base, not the base"
    # the merged model is the tuned model on the ORIGINAL base's files: base + (W_res + DoRA) - W
    assert result.merge_report["verification"]["passed"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(result.merged), dtype=torch.float32)
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - tuned).abs().max() < 0.05 * tuned.abs().max()


def test_stage_hashes_ignore_new_fields_at_their_old_values(tiny_model, small_data):
    from prefopt.runs.folder import stage_identity

    recipe = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo"))
    ident = stage_identity(recipe.stages[1].model_dump(mode="json"))
    assert not {"loss_weights", "f_divergence_type", "ld_alpha", "use_weighting"} & set(ident)
    changed = recipe_from_dict(chain_recipe(tiny_model, small_data, "dpo", ld_alpha=0.5))
    assert stage_identity(changed.stages[1].model_dump(mode="json"))["ld_alpha"] == 0.5
