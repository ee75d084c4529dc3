"""W&B tells the truth: a failed or interrupted stage ends its run with a non-zero exit code, a rerun is a new,
distinctly named run in the same group, and the environment's WANDB_MODE wins over the recipe."""

import json

import pytest
from conftest import chain_recipe

import prefopt
from prefopt import recipe_from_dict
from prefopt.stages import STAGES


def _runs(run_dir, *, wait_for: bytes = b""):
    """(run file bytes, exit code) of each offline W&B run, from wandb's own files. The .wandb file is written by
    wandb's service process, which in a long-lived process (the whole test suite) can flush it after finish()
    returns: seen once in CI, the file held only its 8-byte header while debug.log already had the exit code. So
    wait (up to 30 s) until it holds `wait_for`."""
    import time

    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        deadline = time.monotonic() + 30
        blob = next(d.glob("run-*.wandb")).read_bytes()
        while wait_for not in blob and time.monotonic() < deadline:
            time.sleep(0.2)
            blob = next(d.glob("run-*.wandb")).read_bytes()
        log = (d / "logs" / "debug.log").read_text()
        code = int(log.rsplit("got exitcode: ", 1)[1].split()[0])
        out.append((blob, code))
    return out


def test_failed_stage_is_recorded_with_its_exit_code_and_rerun_gets_a_new_name(tmp_path, tiny_model, small_data,
                                                                              monkeypatch):
    raw = chain_recipe(tiny_model, small_data, None, wandb="offline")
    out = tmp_path / "run"
    real = STAGES["sft"]

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setitem(STAGES, "sft", broken)
    with pytest.raises(RuntimeError):
        prefopt.run(recipe_from_dict(raw), output_dir=out)
    monkeypatch.setitem(STAGES, "sft", real)
    prefopt.run(recipe_from_dict(raw), output_dir=out)
    runs = _runs(out)
    assert len(runs) == 2 and all(b"chain/sft" in blob for blob, _ in runs)
    # two runs may start within the same second, so their folders' order says nothing: tell them by name
    (first, first_code), = [r for r in runs if b"chain/sft#2" not in r[0]]
    (second, second_code), = [r for r in runs if b"chain/sft#2" in r[0]]
    assert (first_code, second_code) == (1, 0)
    m = json.loads((out / "run.json").read_text())
    assert m["stages"][0]["attempts"] == 2 and f"chain-{m['run_id']}".encode() in second


def test_interrupted_stage_run_ends_with_exit_code_130(tmp_path):
    from prefopt.config import WandbSection
    from prefopt.tracking import stage_run

    with pytest.raises(KeyboardInterrupt):
        with stage_run(WandbSection(mode="offline"), run_dir=tmp_path, group="g", name="r/s", job_type="sft",
                       config={}):
            raise KeyboardInterrupt
    (blob, code), = _runs(tmp_path, wait_for=b"interrupted")
    assert code == 130 and b"interrupted" in blob


def test_environment_wandb_mode_overrides_the_recipe(tmp_path, monkeypatch):
    from prefopt.tracking import effective_mode

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert effective_mode("online") == ("offline", "env")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert effective_mode("offline") == ("disabled", "env")
    monkeypatch.delenv("WANDB_MODE")
    assert effective_mode("online") == ("online", "recipe")
