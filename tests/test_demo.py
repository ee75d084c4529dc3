"""The shipped demo recipe, end to end, through the CLI (the tiny model is built offline)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_learns_the_preference(tmp_path, tiny_model):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "run", "recipes/demo.yaml", "--output-dir", str(out),
         "--set", f"model.name_or_path={tiny_model}", "--set", "tracking.wandb.mode=disabled"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["done", "done"]
    acc = manifest["stages"][1]["metrics"]["eval"]["eval_rewards/accuracies"]
    assert acc >= 0.75, f"held-out reward accuracy {acc}"
    assert "held-out reward accuracy" in proc.stderr
    # ... and ends with a verified merge that loads without PEFT
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    assert report["base_mode"] == "dequantized" and report["verification"]["passed"]
    assert manifest["merge"]["status"] == "done"
    assert "merge PASSED" in proc.stderr
    # ... evaluated before the merge, on the shipped synthetic MMLU-layout set, with a report to open
    log = json.loads((out / "eval" / "eval_log.json").read_text())
    assert log["passed"] and log["mmlu"]["tuned"]["n"] == 24 and manifest["eval"]["passed"]
    assert len((out / "eval" / "completions.jsonl").read_text().splitlines()) == 25
    assert (out / "report.html").is_file() and (out / "merged" / "README.md").is_file()
