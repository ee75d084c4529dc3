"""A sweep point's overhead over the same `prefopt run` alone: the recipe with one override, run by `prefopt run
--set KEY=VALUE` and by `prefopt sweep --grid KEY=VALUE` (a one-point sweep), side by side (alternating, each in a
fresh process with its own empty shared cache, so both train every stage).

    python scripts/bench_sweep.py [--recipe recipes/demo.yaml] [--set stages.dpo.beta=0.2] [--reps 4]

Before it reports a ratio it checks that both did the same work: every stage trained (none reused), the same steps,
and byte-identical final adapters. It prints the median whole-process wall time of each, the ratio sweep / run
(target <= 1.05), and the point's own wall time as the sweep records it (sweep.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFOPT = [sys.executable, "-m", "prefopt.cli"]


def _timed(cmd: list[str], cache: Path) -> float:
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return took


def _work(run_dir: Path) -> tuple[list, bytes]:
    """What a run folder did: (stage, trained or reused, steps) per stage, whether it was evaluated and merged
    (verified), and the final adapter's bytes."""
    m = json.loads((run_dir / "run.json").read_text())
    stages = [(s["name"], "reused" if s.get("reused_from") else "trained", s["metrics"]["train"].get("steps"))
              for s in m["stages"]]
    merged = run_dir / "merged" / "merge_report.json"
    verified = merged.is_file() and bool(json.loads(merged.read_text()).get("verification", {}).get("passed"))
    stages.append(("eval", (run_dir / "eval" / "eval_log.json").is_file()))
    stages.append(("merged and verified", verified))
    return stages, (run_dir / m["stages"][-1]["adapter"] / "adapter_model.safetensors").read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    ap.add_argument("--set", dest="override", default="stages.dpo.beta=0.2",
                    help="The point: one KEY=VALUE, --set for the run, --grid for the sweep.")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    key, _, value = args.override.partition("=")
    runs, sweeps, points = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        for rep in range(args.reps):
            run_dir, sweep_dir = tmp / f"run{rep}", tmp / f"sweep{rep}"
            run = [*PREFOPT, "run", args.recipe, "--set", args.override, "--output-dir", str(run_dir), "-q"]
            sweep = [*PREFOPT, "sweep", args.recipe, "--grid", f"{key}={value}", "--output-dir", str(sweep_dir), "-q"]
            # alternate which goes first, so neither always finds the other's files in the page cache
            for cmd, times, cache in ((run, runs, "run"), (sweep, sweeps, "sweep"))[:: 1 if rep % 2 == 0 else -1]:
                times.append(_timed(cmd, tmp / f"cache-{cache}{rep}"))
            (point,) = [p for p in sweep_dir.iterdir() if (p / "run.json").is_file()]
            points.append(json.loads((sweep_dir / "sweep.json").read_text())["points"][point.name]["wall_s"])
            a, b = _work(run_dir), _work(point)
            if a[0] != b[0] or any(w[1] not in ("trained", True) for w in a[0]):
                sys.exit(f"not the same work: run {a[0]}, sweep point {b[0]}")
            if a[1] != b[1]:
                sys.exit("the final adapters differ: the run and the sweep point did not do the same work")
            print(f"rep {rep + 1}: run {runs[-1]:.1f} s, sweep {sweeps[-1]:.1f} s (its point {points[-1]:.1f} s); "
                  f"stages {a[0]}; final adapters identical", flush=True)
    r, s, p = statistics.median(runs), statistics.median(sweeps), statistics.median(points)
    print(f"\n{args.recipe} with {args.override}, medians of {args.reps} (whole process, CPU):")
    print(f"  prefopt run                 {r:7.1f} s")
    print(f"  prefopt sweep (one point)   {s:7.1f} s   ratio sweep / run = {s / r:.3f} (target <= 1.05)")
    print(f"  the point inside the sweep  {p:7.1f} s   ratio point / run = {p / r:.3f}")


if __name__ == "__main__":
    main()
