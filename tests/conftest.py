"""Shared fixtures: a tiny random Llama built offline, small data files, recipe dicts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# never reach the network, whatever the recipe says; WANDB_MODE=disabled stays (scripts/gpu_check.sh: the GPU machine
# has no wandb, and offline would import it)
if os.environ.get("WANDB_MODE") != "disabled":
    os.environ["WANDB_MODE"] = "offline"
# never the user's own shared cache (module-scoped runs come before the per-test one below)
os.environ.setdefault("PREFOPT_CACHE_DIR", os.path.join(__import__("tempfile").mkdtemp(prefix="prefopt-cache-")))

DEMO_DATA = ROOT / "data" / "demo"


@pytest.fixture(autouse=True)
def _own_shared_cache(tmp_path, monkeypatch):
    """Each test its own shared cache (finished stages, reference log-probs): no test reuses another's stages."""
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "prefopt-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", DEMO_DATA)


SHAPES = {  # hidden, intermediate, biases: in_features 96 and 200 are not multiples of 64
    "h64": dict(hidden_size=64, intermediate_size=128),
    "h96": dict(hidden_size=96, intermediate_size=200),
    "bias": dict(hidden_size=80, intermediate_size=136, attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="session")
def shaped_models(tmp_path_factory):
    """Tiny random Llamas (two decoder layers) of several shapes, for the DoRA tests."""
    from demo_assets import build_tiny_model

    root = tmp_path_factory.mktemp("dora-shapes")
    return {k: build_tiny_model(root / k, DEMO_DATA, **v) for k, v in SHAPES.items()}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def small_data(tmp_path) -> dict[str, Path]:
    """40 SFT rows and 40 preference rows taken from the shipped demo data."""
    sft = (DEMO_DATA / "sft.jsonl").read_text().splitlines()[:40]
    prefs = (DEMO_DATA / "prefs.jsonl").read_text().splitlines()[:40]
    return {"sft": write_jsonl(tmp_path / "sft.jsonl", sft), "prefs": write_jsonl(tmp_path / "prefs.jsonl", prefs)}


FAST_TRAIN = {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "max_length": 96, "learning_rate": 3e-3,
              "gradient_checkpointing": False, "logging_steps": 1, "warmup_ratio": 0.0}


def chain_recipe(model: Path, data: dict, pref_type: str | None = "dpo", *, quantization="nf4", wandb="disabled",
                 name="chain", **pref_opts) -> dict:
    stages = [{"name": "sft", "type": "sft", "data": {"path": str(data["sft"]), "eval_fraction": 0.1},
               "train": dict(FAST_TRAIN)}]
    if pref_type:
        stages.append({"name": pref_type, "type": pref_type, "data": {"path": str(data["prefs"]), "eval_fraction": 0.2},
                       "train": dict(FAST_TRAIN, learning_rate=1e-3), **pref_opts})
    return {
        "name": name,
        "seed": 0,
        "model": {"name_or_path": str(model), "quantization": quantization, "dtype": "float32"},
        "adapter": {"method": "dora", "r": 8, "alpha": 16, "dropout": 0.05},
        "stages": stages,
        "tracking": {"wandb": {"mode": wandb, "project": "prefopt-tests"}},
    }
