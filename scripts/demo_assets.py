"""Offline assets for the demo and the tests: shipped data and a tiny random Llama.

    python scripts/demo_assets.py data   data/demo     # (re)write the shipped demo data
    python scripts/demo_assets.py model  demo/tiny-llama [--data data/demo]
    python scripts/demo_assets.py mmlu   data/demo/mmlu_synthetic   # a SYNTHETIC set in MMLU's layout

Nothing here is downloaded: the tokenizer is a byte-level BPE trained on the demo data,
the model a randomly initialised Llama (hidden size 64). Never imported by prefopt.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = [
    "the sea", "a cat", "the rain", "a garden", "the moon", "a river", "the city", "a forest", "the snow",
    "a dog", "the sun", "a bridge", "the market", "a song", "the wind", "a lamp", "the library", "a train",
    "the mountain", "a letter", "the kitchen", "a bicycle", "the harbor", "a candle", "the desert", "a violin",
    "the island", "a clock", "the meadow", "a painting", "the valley", "a teacup", "the school", "a ship",
    "the bakery", "a kite", "the orchard", "a window", "the village", "a storm",
]
GOOD = ["kind", "calm", "bright", "gentle", "warm", "lovely", "clear", "friendly", "honest", "cheerful", "graceful",
        "sweet"]
BAD = ["rude", "dull", "cold", "harsh", "awful", "messy", "boring", "noisy", "gloomy", "grim", "sour", "nasty"]
PROMPTS = ["Tell me about {t}.", "What do you think of {t}?", "Describe {t}.", "Say something about {t}."]


def _answer(rng: random.Random, topic: str, words: list[str]) -> str:
    picked = rng.sample(words, rng.randint(2, 4))
    return f"{topic.capitalize()} is " + " and ".join(picked) + "."


def make_data(out: Path, seed: int = 0, n_sft: int = 320, n_pref: int = 320) -> None:
    """SFT answers mix good and bad words (they teach the format); preference pairs teach the rule:
    chosen answers use only kind words, rejected ones only unkind words. The rule is learnable and
    generalises to held-out pairs, so DPO's held-out reward accuracy rises clearly above chance."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sft.jsonl", "w") as f:
        for _ in range(n_sft):
            t = rng.choice(TOPICS)
            mixed = rng.sample(GOOD, 2) + rng.sample(BAD, 2)
            answer = _answer(rng, t, mixed)
            msgs = [{"role": "user", "content": rng.choice(PROMPTS).format(t=t)},
                    {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(out / "prefs.jsonl", "w") as f:
        for _ in range(n_pref):
            t = rng.choice(TOPICS)
            prompt = rng.choice(PROMPTS).format(t=t)
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": _answer(rng, t, GOOD)}],
                "rejected": [{"role": "assistant", "content": _answer(rng, t, BAD)}],
            }
            f.write(json.dumps(row) + "\n")


def make_feedback(out: Path, seed: int = 1, n: int = 320, desirable: float = 0.35) -> None:
    """KTO's unpaired feedback, generated like the pairs: one answer per prompt, desirable (label true) when it uses
    only kind words, undesirable when only unkind ones; about a third desirable, as thumbs-up data often is (the KTO
    stage balances the weights). A separate seed: sft.jsonl and prefs.jsonl stay as they were."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "feedback.jsonl", "w") as f:
        for _ in range(n):
            t = rng.choice(TOPICS)
            good = rng.random() < desirable
            row = {"prompt": [{"role": "user", "content": rng.choice(PROMPTS).format(t=t)}],
                   "completion": [{"role": "assistant", "content": _answer(rng, t, GOOD if good else BAD)}],
                   "label": good}
            f.write(json.dumps(row) + "\n")


MMLU_SUBJECTS = ("synthetic_word_mood", "synthetic_counting", "synthetic_topics")


def _mmlu_question(rng: random.Random, subject: str) -> tuple[str, list[str], int]:
    if subject == "synthetic_word_mood":
        good, bads = rng.choice(GOOD), rng.sample(BAD, 3)
        choices, answer = bads + [good], 3
        q = "Which word is kind?"
    elif subject == "synthetic_counting":
        n = rng.randint(1, 6)
        q = f"How many words: {' '.join(rng.sample(GOOD + BAD, n))}?"
        choices, answer = [str(k) for k in rng.sample([x for x in range(1, 10) if x != n], 3)] + [str(n)], 3
    else:
        t = rng.choice(TOPICS)
        others = rng.sample([x for x in TOPICS if x != t], 3)
        q = f"Which one is in: Tell me about {t}."
        choices, answer = others + [t], 3
    order = list(range(4))
    rng.shuffle(order)
    return q, [choices[i] for i in order], order.index(answer)


def make_mmlu(out: Path, seed: int = 0, n_dev: int = 5, n_test: int = 8) -> None:
    """A SYNTHETIC multiple-choice set in the original Hendrycks MMLU layout (dev/<subject>_dev.csv,
    test/<subject>_test.csv; no header: question, A, B, C, D, answer). It is not MMLU: its questions are
    generated from the demo's words so the tiny demo model can read them. For the demo and the tests only."""
    import csv

    rng = random.Random(seed)
    for split, n in (("dev", n_dev), ("test", n_test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for subject in MMLU_SUBJECTS:
            with open(out / split / f"{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                for _ in range(n):
                    q, choices, answer = _mmlu_question(rng, subject)
                    w.writerow([q, *choices, "ABCD"[answer]])
    (out / "README.md").write_text(
        "# SYNTHETIC multiple-choice set in the MMLU (Hendrycks) layout -- NOT MMLU\n\n"
        "Generated by `python scripts/demo_assets.py mmlu data/demo/mmlu_synthetic` from the demo's own words, so\n"
        "that the tiny demo model (whose tokenizer knows only those words) can be evaluated offline through the\n"
        "same lm-evaluation-harness path as the real benchmark. Its accuracies say nothing about any real model.\n\n"
        "Layout (the original MMLU release): `dev/<subject>_dev.csv` (few-shot examples) and\n"
        "`test/<subject>_test.csv`, no header, columns: question, A, B, C, D, answer letter.\n"
        f"Subjects: {', '.join(MMLU_SUBJECTS)}; {n_dev} dev and {n_test} test questions each.\n")


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(data_dir: Path | None) -> list[str]:
    texts = []
    if data_dir is not None:
        for p in sorted(Path(data_dir).glob("*.jsonl")):
            if p.name == "feedback.jsonl":  # added later, and its words are the pairs': the tokenizer stays the same
                continue
            texts += p.read_text().splitlines()
    texts += [_answer(random.Random(i), t, GOOD + BAD) for i, t in enumerate(TOPICS)]
    texts += [p.format(t=t) for p in PROMPTS for t in TOPICS]
    texts += ["user assistant system instruction input output text Alpaca", "0 1 2 3 4 5 6 7 8 9 , ; : ! ? ' \""]
    return texts


def build_tokenizer(out: Path, data_dir: Path | None = None, vocab_size: int = 640):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(data_dir), vocab_size=vocab_size, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return tok


def build_tiny_model(
    out: str | Path,
    data_dir: str | Path | None = None,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config,
) -> Path:
    """A tiny random Llama + tokenizer saved as a normal HF folder (safetensors); `config` overrides LlamaConfig."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, Path(data_dir) if data_dir else None)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=config.pop("num_attention_heads", 4),
        num_key_value_heads=config.pop("num_key_value_heads", 2),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **config,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # biases (when the config asks for them) start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["data", "model", "mmlu"])
    ap.add_argument("out")
    ap.add_argument("--data", default="data/demo", help="data folder the tokenizer is trained on")
    args = ap.parse_args()
    if args.what == "data":
        make_data(Path(args.out))
        make_feedback(Path(args.out))
    elif args.what == "mmlu":
        make_mmlu(Path(args.out))
    else:
        build_tiny_model(args.out, args.data)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
