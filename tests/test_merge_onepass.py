"""The default merge merges and verifies in one pass (prefopt.merging.onepass): its checkpoint is the streaming
merge's, tensor for tensor; and its verification still fails on each way a merge goes wrong -- a dropped DoRA
magnitude, a wrong base, a wrong scale, a transposed weight, tensors swapped in the files, an NF4-vs-original mix-up
-- under the default thresholds."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_merge import make_adapter

import prefopt.merging.stream as stream
import prefopt.merging.tensorfile as tensorfile
from prefopt.errors import MergeError
from prefopt.merging import onepass
from prefopt.merging.stream import merge_adapter, read_adapter, stream_merge


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _failures(tmp_path, adapter, name="m", **kw):
    """Merge with the default thresholds; the verification must fail: its failures."""
    with pytest.raises(MergeError, match="does not behave like the adapter model"):
        merge_adapter(adapter, tmp_path / name, echo=lambda s: None, **kw)
    v = json.loads((tmp_path / name / "merge_report.json").read_text())["verification"]
    assert not v["passed"]
    return v["failures"]


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_the_verified_merge_writes_the_streaming_merges_checkpoint(tmp_path, tiny_model, quantization):
    """Same tensors, bit for bit, as stream_merge (the merge without verification) and the same shard layout; the
    report says every adapted layer was checked, every tensor read back, and how the time split."""
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization=quantization)
    report = merge_adapter(adapter, tmp_path / "one", echo=lambda s: None)
    info = json.loads((adapter / "prefopt_base.json").read_text())
    stream_merge(read_adapter(adapter), tiny_model, tmp_path / "plain", info=info, base_mode=report["base_mode"],
                 out_dtype="bfloat16")
    ours, plain = _tensors(tmp_path / "one"), _tensors(tmp_path / "plain")
    assert ours.keys() == plain.keys()
    for k, t in plain.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k
    v = report["verification"]
    assert v["passed"] and v["layers"]["checked"] == report["tensors_merged"] == 14
    assert v["layers"]["max_rel_diff"] < v["layers"]["limit"] / 4
    assert v["read_back"] == {"tensors": len(plain), "problems": []}
    # the merge runs in a thread of its own while the verification starts: the two overlap
    split = report["time_s"]
    assert set(split) == {"merge", "verification", "total"}
    assert max(split["merge"], split["verification"]) <= split["total"] + 0.02
    assert split["merge"] + split["verification"] >= split["total"] - 0.02


def test_a_sharded_merge_matches_and_says_its_progress(tmp_path, sharded_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(sharded_model, tmp_path / "a")
    monkeypatch.setattr(onepass, "PROGRESS_EVERY_S", 0.0)
    lines = []
    merge_adapter(adapter, tmp_path / "one", out_dtype="float32", echo=lines.append)
    info = json.loads((adapter / "prefopt_base.json").read_text())
    stream_merge(read_adapter(adapter), sharded_model, tmp_path / "plain", info=info, base_mode="original",
                 out_dtype="float32", max_shard_bytes=256 * 2**20)
    assert (tmp_path / "one" / "model.safetensors").is_file() == (tmp_path / "plain" / "model.safetensors").is_file()
    ours, plain = _tensors(tmp_path / "one"), _tensors(tmp_path / "plain")
    assert all(torch.equal(ours[k], t) for k, t in plain.items()) and ours.keys() == plain.keys()
    bars = [s for s in lines if s.startswith("prefopt: merge [")]
    assert bars and "GiB written" in bars[-1] and "left" in bars[-1] and "layer " in bars[-1], lines
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "one"))
    # small shards: several files and an index, the layout planned before any tensor is written
    monkeypatch.setattr(stream, "stream_merge", _small_shards(stream.stream_merge))
    merge_adapter(adapter, tmp_path / "small", out_dtype="float32", echo=lambda s: None)
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and index["weight_map"].keys() == plain.keys()
    assert all(torch.equal(t, plain[k]) for k, t in _tensors(tmp_path / "small").items())


def _small_shards(real):
    def small(*a, **k):
        return real(*a, **{**k, "max_shard_bytes": 100_000})

    return small


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    from conftest import DEMO_DATA
    from demo_assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("sharded") / "m", DEMO_DATA, max_shard_size="200KB", seed=1)


def test_a_dropped_magnitude_fails(tmp_path, tiny_model, monkeypatch):
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    real = stream.merged_weight
    monkeypatch.setattr(stream, "merged_weight", lambda w, a, b, s, m=None: real(w, a, b, s, None))
    assert any(f.startswith("layer model.layers.") for f in _failures(tmp_path, adapter))


def test_a_wrong_base_fails(tmp_path, tiny_model, sharded_model, monkeypatch):
    """The merge reads another model's tensors (same shapes) where the adapter's base should be."""
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    other = _tensors(sharded_model)
    real = stream.merge_tensor

    def from_another_base(key, raw, parts, **kw):
        return real(key, other[key].to(raw.device), parts, **kw)

    monkeypatch.setattr(stream, "merge_tensor", from_another_base)
    failures = _failures(tmp_path, adapter)
    assert any(f.startswith("layer ") for f in failures) and any(f.startswith("mean KL") for f in failures)


def test_a_wrong_scale_fails(tmp_path, tiny_model, monkeypatch):
    """alpha / sqrt(r) (rsLoRA) where the adapter was trained with alpha / r: r 4, so twice the scale."""
    adapter = make_adapter(tiny_model, tmp_path / "a")
    real = stream.read_adapter

    def rslora_scale(folder):
        a = real(folder)
        assert a.scale == 2.0
        a.scale = a.config["lora_alpha"] / a.config["r"] ** 0.5
        return a

    monkeypatch.setattr(stream, "read_adapter", rslora_scale)
    assert any(f.startswith("layer ") for f in _failures(tmp_path, adapter))


def test_a_transposed_weight_fails(tmp_path, tiny_model, monkeypatch):
    adapter = make_adapter(tiny_model, tmp_path / "a")
    real = stream.merge_tensor
    key = "model.layers.1.self_attn.q_proj.weight"

    def transposed(k, raw, parts, **kw):
        t = real(k, raw, parts, **kw)
        return t.T.contiguous() if k == key else t

    monkeypatch.setattr(stream, "merge_tensor", transposed)
    assert any(f.startswith(f"layer {key}") for f in _failures(tmp_path, adapter))


def test_tensors_swapped_in_the_files_fail(tmp_path, tiny_model, monkeypatch):
    """Two layers' merged tensors land at each other's place in the shard: the model computed right, the files are
    wrong; the read-back finds it."""
    adapter = make_adapter(tiny_model, tmp_path / "a")
    real = tensorfile.Writer.write
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"

    def swapped(self, key, t):
        return real(self, {a: b, b: a}.get(key, key), t)

    monkeypatch.setattr(tensorfile.Writer, "write", swapped)
    failures = _failures(tmp_path, adapter)
    back = [f for f in failures if f.startswith("read back from the written files")]
    assert back and a in back[0] and b in back[0], failures
    # the merged half runs on the weights as the files hold them: the layer check sees it too
    assert any(f.startswith(("layer " + a, "layer " + b)) for f in failures), failures


def test_an_nf4_vs_original_mix_up_fails(tmp_path, tiny_model, monkeypatch):
    """The adapter trained on NF4; the merge (asked for the dequantized base) puts it on the original weights."""
    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    monkeypatch.setattr(stream, "roundtrip", lambda w, info: w.float())
    failures = _failures(tmp_path, adapter)
    assert any(f.startswith("layer ") for f in failures), failures


def test_merging_into_the_originals_on_purpose_checks_the_merge_against_them(tmp_path, tiny_model):
    """base: original after an NF4 base is a choice, not a mix-up: each layer's merge is checked against the
    adapter on the original weights (exact), and the logits against the trained model show the quantization gap."""
    from test_merge import LOOSE

    adapter = make_adapter(tiny_model, tmp_path / "a", quantization="nf4")
    report = merge_adapter(adapter, tmp_path / "m", base_mode="original", thresholds=LOOSE, echo=lambda s: None)
    v = report["verification"]
    assert v["passed"] and v["layers"]["max_rel_diff"] < v["layers"]["limit"] / 4
    assert v["max_rel_logit_diff"] > 0.05


def test_peft_forward_is_opt_in_above_a_small_base(tmp_path, tiny_model, monkeypatch):
    """auto: on for a base under 1 GiB (the tiny model), off above; True / False as asked."""
    adapter = make_adapter(tiny_model, tmp_path / "a")
    assert "peft_forward" in merge_adapter(adapter, tmp_path / "auto", echo=lambda s: None)["verification"]
    off = merge_adapter(adapter, tmp_path / "off", peft_forward=False, echo=lambda s: None)["verification"]
    assert "peft_forward" not in off and off["passed"]
    monkeypatch.setattr(onepass, "PEFT_AUTO_MAX_BYTES", 1)  # every base is "large" now
    large = merge_adapter(adapter, tmp_path / "large", echo=lambda s: None)["verification"]
    assert "peft_forward" not in large
    on = merge_adapter(adapter, tmp_path / "on", peft_forward=True, echo=lambda s: None)["verification"]
    assert on["peft_forward"]["probes"] == 2 and on["peft_forward"]["max_abs_logit_diff_vs_trained"] < 1e-3


def test_an_error_in_the_merge_thread_is_raised_and_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    import sys

    adapter = make_adapter(tiny_model, tmp_path / "a")

    def broken(key, raw, parts, **kw):
        raise RuntimeError("boom in the merge thread")

    monkeypatch.setattr(stream, "merge_tensor", broken)
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError, match="boom in the merge thread"):
        merge_adapter(adapter, tmp_path / "m", echo=lambda s: None)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m*")), "nothing half-written"
    assert sys.getswitchinterval() == before


def test_a_base_on_another_file_system_is_copied_through_memory(tmp_path, tiny_model, monkeypatch):
    """copy_file_range raises EXDEV across file systems (the hub cache on one disk, the output on another): the
    untouched tensors then go through a bounded buffer (review finding: the merge failed there)."""
    import errno
    import os

    adapter = make_adapter(tiny_model, tmp_path / "a")
    calls = []

    def cross_device(*a):
        calls.append(a)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device, raising=False)
    report = merge_adapter(adapter, tmp_path / "m", out_dtype="float32", echo=lambda s: None)
    assert report["verification"]["passed"] and len(calls) == 1  # tried once, then through memory
    stream_merge(read_adapter(adapter), tiny_model, tmp_path / "plain", info=json.loads(
        (adapter / "prefopt_base.json").read_text()), base_mode="original", out_dtype="float32")
    plain = _tensors(tmp_path / "plain")
    assert all(torch.equal(t, plain[k]) for k, t in _tensors(tmp_path / "m").items())


def test_a_truncated_base_is_refused_before_any_work(tmp_path, tiny_model):
    """A shard shorter than its header says (a partial download): refused at once, nothing left behind (review
    finding: the merge thread waited forever)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    adapter = make_adapter(base, tmp_path / "a")
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MergeError, match="cut short"):
        merge_adapter(adapter, tmp_path / "m", echo=lambda s: None)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp*"))


def test_an_fp32_base_trained_in_bf16_merged_to_fp32_passes(tmp_path, tiny_model):
    """The merge folds the adapter into the stored fp32 weight; the layer check uses that weight, not the bf16-rounded
    one training saw (review finding: a false failure, 9e-4 against the fp32 limit 1e-4)."""
    adapter = make_adapter(tiny_model, tmp_path / "a")
    info = json.loads((adapter / "prefopt_base.json").read_text())
    (adapter / "prefopt_base.json").write_text(json.dumps({**info, "dtype": "bfloat16"}))
    v = merge_adapter(adapter, tmp_path / "m", out_dtype="float32", echo=lambda s: None)["verification"]
    assert v["passed"] and v["layers"]["max_rel_diff"] < v["layers"]["limit"], v


def test_a_large_cast_tensor_goes_in_blocks(tmp_path, tiny_model, monkeypatch):
    """A tensor the merge only casts (the embedding, fp32 -> bf16) is read, cast and written a block of rows at a
    time, never whole; the result is the streaming merge's, and its sampled rows are read back."""
    adapter = make_adapter(tiny_model, tmp_path / "a")
    monkeypatch.setattr(onepass, "BLOCK_BYTES", 4096)
    report = merge_adapter(adapter, tmp_path / "m", echo=lambda s: None)
    assert report["verification"]["passed"]
    stream_merge(read_adapter(adapter), tiny_model, tmp_path / "plain", info=json.loads(
        (adapter / "prefopt_base.json").read_text()), base_mode="original", out_dtype="bfloat16")
    plain, ours = _tensors(tmp_path / "plain"), _tensors(tmp_path / "m")
    assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert all(torch.equal(t, plain[k]) for k, t in ours.items())


def test_a_killed_merges_temp_folder_is_removed_by_the_next(tmp_path, tiny_model):
    import subprocess
    import sys

    adapter = make_adapter(tiny_model, tmp_path / "a")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.tmp-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    merge_adapter(adapter, tmp_path / "m", echo=lambda s: None)
    assert not stale.exists() and (tmp_path / "m" / "merge_report.json").is_file()


def test_a_wrong_config_copied_fails(tmp_path, tiny_model, monkeypatch):
    adapter = make_adapter(tiny_model, tmp_path / "a")
    real = stream.copy_side_files

    def wrong_config(base_dir, adapter_dir, out_dir, out_dtype):
        real(base_dir, adapter_dir, out_dir, out_dtype)
        cfg = json.loads((out_dir / "config.json").read_text())
        (out_dir / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 0.5}))

    monkeypatch.setattr(stream, "copy_side_files", wrong_config)
    failures = _failures(tmp_path, adapter)
    assert any("config.json differs from the base's in rms_norm_eps" in f for f in failures), failures
