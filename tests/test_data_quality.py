"""The data step: planted defects found and counted by name, no held-out row with a twin in training, formats,
mixtures, assistant-only SFT labels, the reference filter, `prefopt data`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from click.testing import CliRunner
from conftest import chain_recipe, write_jsonl
from planted_data import KINDS
from planted_data import write as write_planted

from prefopt import recipe_from_dict
from prefopt.data import REASONS, prepare_stage
from prefopt.data.quality import row_words, shingles


def _stage(tmp_path, path, kind="dpo", **data):
    raw = {"name": "q", "model": {"name_or_path": str(tmp_path)},
           "stages": [{"name": "s", "type": kind, "data": {"path": str(path), **data}}]}
    return recipe_from_dict(raw).stages[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model):
    from prefopt.models import load_tokenizer

    folder = tmp_path_factory.mktemp("planted")
    path, eval_set, labels = write_planted(folder / "prefs.jsonl", n_clean=600, n_each=25, seed=3)
    stage = _stage(folder, path, eval_fraction=0.15, quality={"decontaminate": [str(eval_set)]})
    data = prepare_stage(stage, seed=0, tokenizer=load_tokenizer(str(tiny_model)), max_length=256)
    return data, labels, path


def test_planted_defects_are_found_by_name(planted):
    data, labels, path = planted
    found = {d["row"]: d["reason"] for d in data.dropped}
    for kind in KINDS:
        rows = [i + 1 for i, lab in enumerate(labels) if lab == kind]
        hit = sum(found.get(r) == kind for r in rows)
        assert hit / len(rows) >= 0.9, (kind, hit, len(rows), Counter(found.get(r) for r in rows))
        assert data.report["dropped"][kind] >= hit
    clean = [i + 1 for i, lab in enumerate(labels) if lab is None]
    kept = sum(r not in found for r in clean)
    assert kept / len(clean) >= 0.95, (kept, len(clean), Counter(found.get(r) for r in clean if r in found))
    rep = data.report
    assert set(rep["dropped"]) == set(REASONS)
    assert rep["input_rows"] == len(labels)
    assert rep["train_rows"] + rep["eval_rows"] + sum(rep["dropped"].values()) == len(labels)
    assert rep["train_rows"] == len(data.train) and rep["eval_rows"] == len(data.eval)
    import hashlib

    assert rep["sources"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(rep["examples"][k] for k in KINDS)


@pytest.mark.parametrize("engine", ["rensa", "datasketch"])
def test_both_near_duplicate_engines_find_the_planted_twins(planted, engine):
    from prefopt.data.quality import near_duplicates

    data, labels, path = planted
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    found = {i + 1 for i, _ in near_duplicates(rows, set(), 0.85, engine_name=engine)}
    planted_rows = {i + 1 for i, lab in enumerate(labels) if lab in ("near_duplicate", "exact_duplicate")}
    assert len(found & planted_rows) / len(planted_rows) >= 0.9
    clean = {i + 1 for i, lab in enumerate(labels) if lab is None}
    assert not found & clean


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def test_no_held_out_row_has_a_twin_in_training(planted):
    data, _, _ = planted
    train = [shingles(row_words(r)) for r in data.train.to_list()]
    worst = max(_jaccard(e, t) for e in (shingles(row_words(r)) for r in data.eval.to_list()) for t in train)
    assert worst < 0.85, worst  # true Jaccard, computed exactly, not MinHash's estimate


def test_dedup_keeps_the_first_of_each_cluster_and_is_deterministic(tmp_path, tiny_model):
    base = {"prompt": "tell me about the quiet river that runs past the old mill in the valley below the hills",
            "chosen": "it runs slow and clear through the fields and the birds sing on its banks all day long",
            "rejected": "no"}
    twin = dict(base, chosen=base["chosen"].replace("birds", "frogs"))
    other = {"prompt": "what is the capital of france and why did it become the capital city of the kingdom",
             "chosen": "paris became the capital because the kings lived there and trade grew around the seine",
             "rejected": "rome"}
    path = write_jsonl(tmp_path / "p.jsonl", [base, other, twin, base])
    stage = _stage(tmp_path, path, eval_fraction=0)
    a = prepare_stage(stage, seed=0)
    b = prepare_stage(stage, seed=7)
    assert {d["row"]: d["reason"] for d in a.dropped} == {3: "near_duplicate", 4: "exact_duplicate"}
    assert a.dropped == b.dropped  # the seed moves the split, not which of a cluster is kept
    assert a.train.to_list() == [base, other]
    none = prepare_stage(_stage(tmp_path, path, eval_fraction=0, quality={"dedup": "none"}), seed=0)
    assert len(none.train) == 4


def test_formats_hh_sharegpt_ultrafeedback(tmp_path):
    from prefopt.data import normalise_rows

    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Well, thanks.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Go away."}
    n = normalise_rows([hh], "hh", "preference")
    assert n.fmt == "hh_rlhf" and n.rows == [{
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "How are you?"}],
        "chosen": [{"role": "assistant", "content": "Well, thanks."}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}]
    bad = dict(hh, rejected="\n\nHuman: Something else\n\nAssistant: Go away.")
    assert normalise_rows([bad], "hh", "preference").dropped == {"invalid": 1}

    uf = {"prompt": "Name a colour.", "chosen": [{"role": "user", "content": "Name a colour."},
                                                 {"role": "assistant", "content": "Blue."}],
          "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
          "score_chosen": 8.0}
    n = normalise_rows([uf], "uf", "preference")
    assert n.rows[0] == {"prompt": [{"role": "user", "content": "Name a colour."}],
                         "chosen": [{"role": "assistant", "content": "Blue."}],
                         "rejected": [{"role": "assistant", "content": "Seven."}]}

    sg = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"},
                            {"from": "gpt", "value": "Hello!"}]}
    n = normalise_rows([sg], "sg", "sft")
    assert n.fmt == "sharegpt" and n.rows[0]["messages"] == [{"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": "Hello!"}]
    sgp = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
           "rejected": {"from": "gpt", "value": "Bye"}}
    assert normalise_rows([sgp], "sgp", "preference").rows[0]["rejected"] == [{"role": "assistant", "content": "Bye"}]
    pc = normalise_rows([{"prompt": "2+2?", "completion": "4"}], "pc", "sft")
    assert pc.rows[0]["messages"][1] == {"role": "assistant", "content": "4"}


def test_rows_that_cannot_train_are_counted_not_silent(tmp_path):
    from prefopt.data import normalise_rows

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}]}]
    n = normalise_rows(rows, "f", "sft")
    assert len(n.rows) == 1 and n.dropped == {"invalid": 2, "empty": 1}
    assert [r for r, _, _ in n.dropped_rows] == [2, 3, 4]
    assert "unknown role 'robot'" in n.dropped_rows[0][2]


def test_mixture_takes_seeded_fractions_and_counts(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"row a number {i} " * 3} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"row b number {i} " * 3} for i in range(50)])
    raw = {"name": "m", "model": {"name_or_path": "x"},
           "stages": [{"name": "s", "type": "sft", "data": {
               "path": [{"path": str(a), "fraction": 0.3}, {"path": str(b), "rows": 10}], "eval_fraction": 0}}]}
    st = recipe_from_dict(raw).stages[0]
    one, two = prepare_stage(st, seed=1), prepare_stage(st, seed=1)
    assert len(one.train) == 40 and one.train.to_list() == two.train.to_list()
    assert [s["rows_taken"] for s in one.report["sources"]] == [30, 10]
    assert prepare_stage(st, seed=2).train.to_list() != one.train.to_list()


def test_sft_labels_mask_every_non_assistant_token(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from prefopt.models import load_tokenizer
    from prefopt.stages.sft import tokenized

    tok = load_tokenizer(str(tiny_model))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."},
            {"role": "assistant", "content": "The Nile."}, {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "The Amazon."}]
    from datasets import Dataset

    ds = tokenized(Dataset.from_list([{"messages": msgs}]), tok, "assistant")
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_length=128, report_to=[], use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained == "The Nile.<|im_end|>\nThe Amazon.<|im_end|>\n", trained
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "Name a river." in masked and "Be brief." in masked and "The Nile" not in masked
    every = tokenized(Dataset.from_list([{"messages": msgs}]), tok, "all")[0]
    assert all(every["assistant_masks"])


def _write_recipe(tmp_path, raw) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_prefopt_data_writes_reports_and_loads_no_model(tmp_path, tiny_model, small_data, monkeypatch):
    import prefopt.models
    from prefopt.cli import main

    def no_load(*a, **k):
        raise AssertionError("prefopt data loaded the model")

    monkeypatch.setattr(prefopt.models, "load_base_model", no_load)
    raw = chain_recipe(tiny_model, small_data, "dpo")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["data", _write_recipe(tmp_path, raw), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("00-sft", "01-dpo"):
        rep = json.loads((out / "data" / name / "data_report.json").read_text())
        assert rep["train_rows"] > 0 and set(rep["dropped"]) == set(REASONS)
        review = (out / "data" / name / "review_sample.jsonl").read_text().splitlines()
        assert len(review) == min(20, rep["train_rows"])
        assert (out / "data" / name / "review_sample.md").read_text().startswith("# Review sample")
    # the folder `prefopt data` wrote is one `prefopt run` may write into
    from prefopt.runs.folder import is_run_folder

    assert is_run_folder(out)


def test_prefopt_data_bad_rows_exit_2_with_file_and_row(tmp_path, tiny_model, small_data):
    from prefopt.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": 3, "rejected": "b"}])
    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["stages"][1]["data"]["path"] = str(bad)
    result = CliRunner().invoke(main, ["data", _write_recipe(tmp_path, raw), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert (f"{bad} row 2: chosen must be a string or a list of {{role, content}} messages, got int" in result.output
            and "Traceback" not in result.output)

    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": f"q{i} and more words here", "chosen": "same answer",
                                                  "rejected": "same  answer"} for i in range(10)])
    raw["stages"][1]["data"]["path"] = str(same)
    result = CliRunner().invoke(main, ["data", _write_recipe(tmp_path, raw), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "every training row was dropped (10 identical_pair)" in result.output, \
        result.output

    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    raw["stages"][1]["data"]["path"] = str(unknown)
    result = CliRunner().invoke(main, ["data", _write_recipe(tmp_path, raw), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"{unknown} row 1: not a preference row" in result.output, result.output


def test_reference_filter_drops_the_lowest_margins(tmp_path, tiny_model, small_data):
    from prefopt.cli import main

    raw = chain_recipe(tiny_model, small_data, "dpo")
    raw["stages"] = raw["stages"][1:]  # a DPO stage first: its reference is the base
    raw["stages"][0]["data"]["quality"] = {"reference_filter": {"drop_fraction": 0.25}}
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["data", _write_recipe(tmp_path, raw), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    folder = out / "data" / "00-dpo"
    rep = json.loads((folder / "data_report.json").read_text())
    scores = [json.loads(x) for x in (folder / "data_scores.jsonl").read_text().splitlines()]
    n = len(scores)
    assert rep["dropped"]["low_reference_score"] == round(n * 0.25) == sum(not s["kept"] for s in scores)
    assert rep["train_rows"] == n - round(n * 0.25)
    worst_kept = min(s["score"] for s in scores if s["kept"])
    assert all(s["score"] <= worst_kept for s in scores if not s["kept"])
    assert len({round(s["score"], 6) for s in scores}) > 1  # real scores, not a constant


def test_a_shared_system_prompt_does_not_make_rows_near_twins(tmp_path):
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    system = " ".join(rng.choice(vocab) for _ in range(500))
    rows = [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": " ".join(rng.choice(vocab) for _ in range(12))},
                          {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(25))}]}
            for _ in range(100)]
    data = prepare_stage(_stage(tmp_path, write_jsonl(tmp_path / "s.jsonl", rows), "sft", eval_fraction=0), seed=0)
    assert data.report["dropped"]["near_duplicate"] == 0 and len(data.train) == 100


def test_token_checks_too_short_too_long_and_a_refused_template(tmp_path, tiny_model):
    from prefopt.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    long_user = " ".join(["word"] * 300)
    rows = [{"messages": [{"role": "user", "content": "Name a colour please."},
                          {"role": "assistant", "content": "Blue is a calm colour."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},  # too short
            {"messages": [{"role": "user", "content": long_user},  # no trained token within max_length
                          {"role": "assistant", "content": "Fine, that is a long question."}]},
            {"messages": [{"role": "user", "content": "One question here."}, {"role": "user", "content": "Two?"},
                          {"role": "assistant", "content": "Both answered at once."}]}]
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                         "['role'] %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    data = prepare_stage(_stage(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows), "sft", eval_fraction=0,
                                quality={"min_tokens": 8}), seed=0, tokenizer=tok, max_length=64)
    got = {d["row"]: d["reason"] for d in data.dropped}
    assert got == {2: "too_short", 3: "too_long", 4: "invalid"}, data.dropped
    assert "roles must alternate" in next(d["why"] for d in data.dropped if d["row"] == 4)


def test_every_row_is_accounted_for_bom_mixture_and_max_samples(tmp_path):
    a = tmp_path / "a.csv"
    a.write_bytes("\ufeffinstruction,output\n".encode() + "".join(
        f"Say {i} in words please,{i} is the number\n" for i in range(30)).encode())
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"plain text row number {i} with words"} for i in range(20)])
    raw = {"name": "m", "model": {"name_or_path": "x"},
           "stages": [{"name": "s", "type": "sft", "data": {
               "path": [{"path": str(a), "fraction": 0.5}], "eval_fraction": 0.2, "max_samples": 5}}]}
    data = prepare_stage(recipe_from_dict(raw).stages[0], seed=0)
    rep = data.report
    assert rep["sources"][0]["rows_read"] == 30 and rep["sources"][0]["format"] == "alpaca"  # the BOM is not a key
    assert rep["not_sampled"] == 15 and rep["over_max_samples"] == 7 and len(data.train) == 5
    assert rep["train_rows"] + rep["eval_rows"] + sum(rep["dropped"].values()) + rep["not_sampled"] + \
        rep["over_max_samples"] == rep["input_rows"]
    raw["stages"][0]["data"]["path"] = [{"path": str(a)}, {"path": str(b)}]
    with pytest.raises(Exception, match="mix plain `text` rows with chat rows"):
        prepare_stage(recipe_from_dict(raw).stages[0], seed=0)
