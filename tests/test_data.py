import csv
import json

import pytest
from conftest import write_jsonl

from prefopt import DataError, RecipeError, recipe_from_dict
from prefopt.data import check_recipe_data, load_stage_data, normalise_preference, normalise_sft, read_rows


def test_sft_formats_become_chat_or_text():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert normalise_sft([{"messages": msgs, "extra": 1}], "f")[0] == [{"messages": msgs}]
    rows, fmt = normalise_sft([{"instruction": "Add", "input": "1+1", "output": "2"}], "f")
    assert fmt == "alpaca"
    assert rows[0]["messages"] == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    assert normalise_sft([{"text": "plain"}], "f") == ([{"text": "plain"}], "text")


def test_preference_strings_and_messages():
    rows, fmt = normalise_preference([{"prompt": "p", "chosen": "a", "rejected": "b"}], "f")
    assert fmt == "standard" and rows == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    user = [{"role": "user", "content": "p"}]
    row = {"prompt": "p", "chosen": user + [{"role": "assistant", "content": "a"}],
           "rejected": user + [{"role": "assistant", "content": "b"}]}
    rows, fmt = normalise_preference([row], "f")
    # UltraFeedback-style answers repeat the prompt: it is stripped, so the answer is only the assistant turn
    assert fmt == "conversational"
    assert rows[0] == {"prompt": user, "chosen": [{"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "assistant", "content": "b"}]}


def test_malformed_rows_are_named_by_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                              {"prompt": "p", "chosen": "a"},
                                              "{not json"])
    with pytest.raises(DataError, match=r"p.jsonl row 3: not valid JSON"):
        read_rows(str(path))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                              {"prompt": "p", "chosen": "a"},
                                              {"prompt": "", "chosen": "a", "rejected": "b"}])
    rows, label = read_rows(str(path))
    with pytest.raises(DataError) as exc:
        normalise_preference(rows, label)
    assert "row 2: missing rejected" in str(exc.value)
    assert "row 3: prompt is empty or whitespace only (a row that cannot train: empty)" in str(exc.value)


def test_local_file_types(tmp_path):
    rows = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        got, _ = read_rows(str(tmp_path / name))
        assert [r["output"] for r in got] == [f"o{i}" for i in range(5)], name


def test_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(50)])
    recipe = recipe_from_dict({"name": "x", "model": {"name_or_path": "m"},
                               "stages": [{"name": "s", "type": "sft",
                                           "data": {"path": str(path), "eval_fraction": 0.2}}]})
    a = load_stage_data(recipe.stages[0], seed=1)
    b = load_stage_data(recipe.stages[0], seed=1)
    assert (len(a.train), len(a.eval)) == (40, 10)
    assert a.eval["text"] == b.eval["text"]
    assert not set(a.train["text"]) & set(a.eval["text"])


def test_preference_stage_without_rejected_fails_the_recipe(tmp_path):
    sft = write_jsonl(tmp_path / "s.jsonl", [{"text": "t"}])
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a"}])
    recipe = recipe_from_dict({"name": "x", "model": {"name_or_path": "m"},
                               "stages": [{"name": "s", "type": "sft", "data": {"path": str(sft)}},
                                          {"name": "d", "type": "dpo", "data": {"path": str(prefs)}}]})
    with pytest.raises(RecipeError) as exc:
        check_recipe_data(recipe)
    [problem] = exc.value.problems
    assert problem.startswith(f"stages[1].data: {prefs} row 1: not a preference row in a format prefopt reads; "
                              "expected prompt/chosen/rejected")
    assert problem.endswith("got keys ['chosen', 'prompt']")
