"""wandb and lm-eval stay lazy: importing prefopt imports neither, and a run with tracking off and no eval section
needs neither, so a machine without them (the lent GPU machine: scripts/gpu_wheels.sh ships neither) runs it.

Where wandb is installed TRL imports it on its own (trl/trainer/base_trainer.py: `if is_wandb_available(): import
wandb`), so the run is checked with both made absent: `sys.modules[name] = None` makes `import name` fail and
`importlib.util.find_spec(name)` answer None, as on a machine without them."""

import json
import os
import subprocess
import sys

from conftest import ROOT, chain_recipe

OPTIONAL = ("wandb", "lm_eval")

RUN = """
import json, sys
optional = {optional}
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in optional and sys.modules[m] is not None)
import prefopt, prefopt.cli
after_import = loaded()
for name in optional:
    sys.modules[name] = None  # absent from here on
result = prefopt.run(prefopt.recipe_from_dict(json.loads(sys.argv[1])), output_dir=sys.argv[2])
print(json.dumps({{"after_import": after_import, "after_run": loaded(), "stages": [s.name for s in result.stages]}}))
"""


def test_prefopt_imports_neither_and_a_run_without_tracking_or_eval_needs_neither(tmp_path, tiny_model, small_data):
    recipe = chain_recipe(tiny_model, small_data, "dpo", wandb="disabled")
    for stage in recipe["stages"]:
        stage["train"]["max_steps"] = 2
    assert "eval" not in recipe
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_DISABLED")}  # the recipe decides
    proc = subprocess.run([sys.executable, "-c", RUN.format(optional=set(OPTIONAL)), json.dumps(recipe),
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["stages"] == ["sft", "dpo"]
    assert seen["after_import"] == [] and seen["after_run"] == [], seen
