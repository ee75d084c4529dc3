import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit

from prefopt.models import build_lora_config, load_base_model, load_tokenizer
from prefopt.quant import harden_4bit_layers


def _linear4bit(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_nf4_base_loads_quantized_and_frozen(tiny_model):
    model = load_base_model(str(tiny_model), quantization="nf4", dtype="float32")
    layers = _linear4bit(model)
    assert len(layers) == 2 * 7  # q k v o gate up down, per layer; lm_head stays unquantized
    qs = layers[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested, "NF4 with double quantization"
    assert not any(p.requires_grad for p in model.parameters())


def test_cpu_repacking_is_kept_off_so_dequantize_stays_exact(tiny_model):
    """bitsandbytes repacks a Linear4bit's weight on the first eval/no-grad CPU forward when the CPU has
    AVX512-BF16; afterwards dequantize_4bit is scrambled. Simulate such a CPU by turning the flag on, as
    bitsandbytes would, and check that the loader's hardening turns it off and dequantization survives."""
    model = load_base_model(str(tiny_model), quantization="nf4", dtype="float32")
    layers = _linear4bit(model)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    assert harden_4bit_layers(model) == len(layers)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    before = [dequantize_4bit(m.weight.data, m.weight.quant_state).clone() for m in layers]
    model.eval()
    tok = load_tokenizer(str(tiny_model))
    with torch.no_grad():
        model(**tok("The sea is calm.", return_tensors="pt"))
    after = [dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_adapter_config():
    cfg = build_lora_config()
    assert cfg.use_dora and cfg.r == 16 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.05
    assert cfg.target_modules == "all-linear" or cfg.target_modules == {"all-linear"}
    assert not build_lora_config(use_dora=False).use_dora
