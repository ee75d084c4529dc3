"""GPU-only checks (`pytest -m gpu`, skipped without CUDA): the paths GPU users train on, which the CPU suite
can only stand in for. `scripts/gpu_check.sh` runs these and bench_dora on a lent GPU machine."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_DATA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cuda_autocast_step(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                         if p.requires_grad}


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_bf16_autocast_parity_on_cuda(shaped_models, quant):
    """What TRL runs on a GPU (bf16 autocast, fp32 adapters): the one-node path is taken and matches PEFT's DoRA
    under the same autocast within bf16 rounding."""
    from test_dora import N_LAYERS, _ids, _model
    from test_dora_training import _assert_noisy_gaps, _bf16_grads_close

    from prefopt import dora

    torch.manual_seed(0)
    peft = _model(shaped_models["h96"], quant)
    torch.manual_seed(0)
    fast = _model(shaped_models["h96"], quant)
    dora.enable_fast_dora(fast)
    assert next(fast.parameters()).is_cuda
    ids = _ids(4, 33).cuda()
    peft.zero_grad(set_to_none=True)
    peft(input_ids=ids, labels=ids).loss.backward()
    fp32 = {n: p.grad.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    want = _cuda_autocast_step(peft, ids)
    before = dora.path_counts()
    got = _cuda_autocast_step(fast, ids)
    assert dora.path_counts()["one_node"] - before["one_node"] == N_LAYERS
    assert (got[0] - want[0]).abs().max().item() < 0.02 * want[0].abs().max().item()
    _assert_noisy_gaps(_bf16_grads_close(got[1], want[1], fp32))


def test_nf4_sft_dpo_merge_half_billion(tmp_path):
    """A ~0.5B-parameter generated Llama, NF4 + bf16 mixed precision, 20 SFT and 20 DPO steps with the train
    section's defaults, then the recipe's merge with its verification: every stage done, the merge verified."""
    from demo_assets import build_tiny_model

    import prefopt

    model = build_tiny_model(tmp_path / "m", DEMO_DATA, hidden_size=1536, intermediate_size=4096, num_layers=20,
                             num_attention_heads=12, num_key_value_heads=4)
    n_params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(next(model.glob("*.safetensors")))).values())
    assert 0.4e9 < n_params < 0.7e9
    recipe = prefopt.recipe_from_dict({
        "name": "gpu-check",
        "model": {"name_or_path": str(model), "quantization": "nf4", "dtype": "bfloat16"},
        "stages": [
            {"name": "sft", "type": "sft", "data": {"path": str(DEMO_DATA / "sft.jsonl")},
             "train": {"max_steps": 20, "learning_rate": 1e-3, "logging_steps": 1}},
            {"name": "dpo", "type": "dpo", "data": {"path": str(DEMO_DATA / "prefs.jsonl")},
             "train": {"max_steps": 20, "learning_rate": 5e-4, "logging_steps": 1}},
        ],
        "tracking": {"wandb": {"mode": "disabled"}},
        "merge": {"verify": True},
    })
    result = prefopt.run(recipe, output_dir=tmp_path / "run")
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "done"]
    for name in ("sft", "dpo"):
        losses = [h["loss"] for h in json.loads((result.run_dir / "stages" /
                                                 f"{'00' if name == 'sft' else '01'}-{name}" /
                                                 "log_history.json").read_text()) if "loss" in h]
        assert len(losses) >= 20 and all(torch.isfinite(torch.tensor(losses)))
    verification = result.merge_report["verification"]
    assert verification["passed"], verification
    assert verification["device"].startswith("cuda"), verification["device"]
