"""The GPU check's steps, each under its own time limit, with every figure in one JSON file and a short summary.

    python scripts/gpu_check.py run --out DIR [--cpu] [--budget S]   # the checks (scripts/gpu_check.sh runs this)
    python scripts/gpu_check.py env --json FILE                      # versions, requirements met, imports

`run` writes three files into --out (the device tool brings back at most 8): gpu_check.json (every step: status,
seconds, limit, its figures), summary.md and gpu_check.log (each step's whole output). Both are rewritten after
every step, so a command stopped at its limit still returns what was done. With --cpu (the rehearsal) the CUDA-only
steps are skipped and CPU stand-ins at small sizes take their place.

Standard library only: it runs before the shipped wheels are checked, in whatever interpreter is given.
scripts/gpu_wheels.py makes and checks the wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from gpu_wheels import norm, requirement_tools

ROOT = Path(__file__).resolve().parents[1]
# what the checks import, beyond the standard library; printed with versions and where each came from
LIBRARIES = ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "datasets", "pydantic",
             "pydantic-core", "datasketch", "safetensors", "tokenizers", "huggingface-hub", "numpy", "pyarrow",
             "fsspec", "pandas", "typing-extensions", "pyyaml", "rich", "click", "matplotlib", "pytest")
IMPORTS = ("prefopt", "prefopt.config", "prefopt.models", "prefopt.dora", "prefopt.data", "prefopt.stages",
           "prefopt.merging", "prefopt.memory", "prefopt.pipeline", "prefopt.cli", "trl", "trl.experimental.orpo",
           "trl.experimental.cpo", "bitsandbytes", "datasets", "datasketch")
# a run with tracking off and no eval section imports neither (tests/test_lazy_imports.py); the machine has neither
NOT_NEEDED = {"wandb": "tracking off (wandb mode disabled)", "lm-eval": "no eval section",
              "deepspeed": "ZeRO configs only (gpu_check.sh distributed)", "rensa": "optional; datasketch is used"}


# ---------------------------------------------------------------------------------------------- env


def cmd_env(args) -> int:
    """Versions (and whether each came from the shipped wheels), requirements met, imports; JSON to --json."""
    import importlib
    import platform
    from importlib.metadata import PackageNotFoundError, distribution, distributions

    Requirement, Version = requirement_tools()
    site = os.environ.get("GPU_CHECK_SITE")
    out = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
           "shipped_site": site, "versions": {}, "unmet": [], "absent": {}, "imports": {}}

    def version_of(name):
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            return None, None
        where = str(getattr(dist, "_path", "") or "")
        return dist.version, ("shipped" if site and where.startswith(site) else "machine")

    for lib in LIBRARIES:
        v, where = version_of(lib)
        out["versions"][lib] = {"version": v, "from": where}
    # every requirement of what was shipped, and of prefopt itself, against what is importable here
    reqs = []
    if site:
        for dist in distributions(path=[site]):
            reqs += [(dist.metadata["Name"], r) for r in (dist.requires or [])]
    try:
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        reqs += [("prefopt", r) for r in project["dependencies"]]
    except ImportError:  # Python < 3.11: no tomllib; the shipped wheels' requirements still count
        pass
    for owner, spec in reqs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have, _ = version_of(req.name)
        if have is None:
            if norm(req.name) in NOT_NEEDED:
                out["absent"][norm(req.name)] = NOT_NEEDED[norm(req.name)]
            else:
                out["unmet"].append(f"{owner} needs {spec}: not installed")
        elif not req.specifier.contains(Version(have), prereleases=True):
            out["unmet"].append(f"{owner} needs {spec}: {have} here")
    try:
        import torch

        cuda = torch.cuda.is_available()
        out["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
                        "device": torch.cuda.get_device_name(0) if cuda else None,
                        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
                        "bf16": bool(cuda and torch.cuda.is_bf16_supported())}
    except Exception as e:  # noqa: BLE001  (reported, not raised: the step fails on it below)
        out["torch"] = {"error": f"{type(e).__name__}: {e}"}
    for mod in IMPORTS:
        t = time.perf_counter()
        try:
            importlib.import_module(mod)
            out["imports"][mod] = f"ok {time.perf_counter() - t:.2f} s"
        except Exception as e:  # noqa: BLE001
            out["imports"][mod] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out["lazy_imports_ok"] = not {"wandb", "lm_eval"} & set(sys.modules)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"python {out['python']} ({out['executable']})")
    print("torch: " + ", ".join(f"{k} {v}" for k, v in out["torch"].items()))
    for lib, v in out["versions"].items():
        print(f"  {lib:18} {v['version'] or '-':16} {v['from'] or ''}")
    for u in out["unmet"]:
        print(f"  unmet: {u}")
    for name, why in out["absent"].items():
        print(f"  absent, not needed: {name} ({why})")
    for mod, res in out["imports"].items():
        print(f"  import {mod:24} {res}")
    print(f"  wandb / lm_eval imported by the above: {'no' if out['lazy_imports_ok'] else 'YES'}")
    failed = [m for m, r in out["imports"].items() if r.startswith("FAILED")] or "error" in out["torch"]
    return 1 if failed or not out["lazy_imports_ok"] else 0


# ---------------------------------------------------------------------------------------------- run


@dataclass
class Step:
    name: str
    what: str
    limit: int  # seconds; cut to what is left of the budget
    cmd: list[str] = field(default_factory=list)
    result: str | None = None  # the file its figures land in (JSON, or pytest's JUnit XML)
    skip: str | None = None  # why it does not run here
    log_from: int = 0  # where its output begins in gpu_check.log


def plan(py: str, cpu: bool, work: Path) -> list[Step]:
    """The GPU machine's steps, or (cpu) the rehearsal's: the same steps at CPU sizes, CUDA-only ones skipped."""
    me = [py, str(ROOT / "scripts" / "gpu_check.py")]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    gpu_tests = ["tests/test_gpu.py", "tests/test_verify.py"]
    models = work / "models"
    steps = [Step("env", "versions, requirements met, imports (wandb and lm_eval not imported)", 90 if cpu else 40,
                  [*me, "env", "--json", str(work / "env.json")], "env.json")]
    if not cpu:
        return steps + [
            # first (issue 26): DoRA vs LoRA on an unquantized bf16 base under autocast, the one row that misses its
            # target on CPU; bench_dora measures width by width, unquantized and autocast first
            Step("bench_dora", "training step time: LoRA, PEFT's DoRA, prefopt's fast DoRA (bf16 and NF4 bases; the "
                 "unquantized autocast rows first)", 90,
                 [py, "scripts/bench_dora.py", "--widths", "2048", "4096", "--layers", "2", "--batch", "4", "--seq",
                  "512", "--rounds", "4", "--quant", "none", "nf4", "--precision", "autocast", "fp32", "--json",
                  str(work / "bench_dora.json")],
                 "bench_dora.json"),
            Step("gpu_tests", "CUDA bf16-autocast parity of the fast DoRA forward (NF4 and bf16 bases); merge "
                 "verification on the GPU", 90,
                 [*pytest, "-m", "gpu", *gpu_tests, "-k", "not half_billion", "--junitxml",
                  str(work / "gpu_tests.xml")],
                 "gpu_tests.xml"),
            Step("nf4_chain", "~0.5B NF4 Llama, bf16: 20 SFT + 20 DPO steps, merge and verification", 170,
                 [*pytest, "-m", "gpu", "tests/test_gpu.py", "-k", "half_billion", "--junitxml",
                  str(work / "nf4_chain.xml")], "nf4_chain.xml"),
            Step("memory", "memory plan against torch.cuda.max_memory_allocated (bf16 autocast; SFT and DPO)", 110,
                 [py, "scripts/measure_memory.py", "--device", "cuda", "--models", str(models), "--json",
                  str(work / "memory.json")], "memory.json"),
        ]
    tiny = models / "tiny-llama"
    return steps + [
        Step("gpu_tests", "the GPU tests collect (they import); they run only on CUDA", 60,
             [*pytest, "--collect-only", "-m", "gpu", *gpu_tests]),
        Step("nf4_chain", "the 0.5B NF4 chain needs CUDA", 0, skip="CUDA only; the demo step stands in"),
        Step("cpu_tests", "CPU tests that lean on the pinned libraries: fast DoRA against PEFT's (bf16 autocast "
             "too), TRL's DPO reference and ORPO/SimPO, the NF4 merge, lazy wandb/lm_eval", 420,
             [*pytest, "tests/test_lazy_imports.py", "tests/test_dora.py", "tests/test_models.py",
              "tests/test_dora_training.py::test_bf16_autocast_matches_peft_on_the_one_node_path",
              "tests/test_chain.py::test_precomputed_reference_log_probs",  # (the ln 2 test also needs wandb)
              "tests/test_chain.py::test_sft_then_reference_free_methods",
              "tests/test_merge.py::test_4bit_dequantized_merge_matches_and_original_shows_the_gap",
              "tests/test_verify.py::test_streamed_reference_is_the_trained_forward",
              "--junitxml", str(work / "cpu_tests.xml")], "cpu_tests.xml"),
        Step("demo", "the demo recipe on CPU (NF4 SFT -> DPO -> verified merge), tracking off, no eval section", 300,
             ["bash", "-c", f'"$0" scripts/demo_assets.py model {tiny} --data data/demo >/dev/null && "$0" -m '
              f"prefopt.cli run recipes/demo.yaml --output-dir {work / 'demo'} --set model.name_or_path={tiny} "
              "--set tracking.wandb.mode=disabled --set eval=null", py]),
        Step("memory", "memory plan against the profiler's peak, CPU, tiny SFT and DPO rows", 150,
             [py, "scripts/measure_memory.py", "--device", "cpu", "--rows", "0", "1", "--models", str(models),
              "--json", str(work / "memory.json")], "memory.json"),
        Step("bench_dora", "bench_dora at tiny sizes (the step runs; CPU times mean nothing for the GPU)", 150,
             [py, "scripts/bench_dora.py", "--widths", "64", "--layers", "2", "--batch", "2", "--seq", "32",
              "--rounds", "1", "--quant", "nf4", "none", "--dropouts", "0.05", "--json", str(work / "bench_dora.json")],
             "bench_dora.json"),
    ]


def junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = tag, (el.get("message") or "")[:500]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), **({"message": message} if message else {})})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def figures(step: Step, work: Path):
    if not step.result or not (work / step.result).is_file():
        return None
    path = work / step.result
    try:
        return junit(path) if path.suffix == ".xml" else json.loads(path.read_text())
    except (ET.ParseError, json.JSONDecodeError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}


def run_step(step: Step, limit: int, log, env: dict) -> tuple[str, float, int | None]:
    """Run one step in its own process group; on its limit the whole group is killed."""
    log.write(f"\n===== {step.name}: {' '.join(step.cmd)} (limit {limit} s)\n")
    log.flush()
    step.log_from = log.tell()
    t = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timed out", time.monotonic() - t, None
    return ("passed" if code == 0 else "failed"), time.monotonic() - t, code


def summary_md(report: dict) -> str:
    env = report.get("env") or {}
    torch_ = env.get("torch") or {}
    lines = [f"# gpu_check ({'CPU rehearsal' if report['cpu'] else 'GPU'}) {report['started']}", "",
             f"python {env.get('python', '?')}, torch {torch_.get('version', '?')} "
             f"(CUDA {torch_.get('cuda_build')}, device {torch_.get('device') or 'cpu'})", ""]
    versions = env.get("versions") or {}
    if versions:
        shipped = lambda v: " (shipped)" if v["from"] == "shipped" else ""  # noqa: E731
        lines.append("versions: " + ", ".join(f"{k} {v['version'] or '-'}{shipped(v)}" for k, v in versions.items()))
        lines.append("")
    for u in env.get("unmet") or []:
        lines.append(f"- unmet requirement: {u}")
    lines += ["", "| step | status | s | limit s | what |", "| --- | --- | ---: | ---: | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s.get('limit', '')} | {s['what']} |")
    for s in report["steps"]:
        f = s.get("figures") or {}
        if "counts" in f:
            lines += ["", f"## {s['name']}: " + ", ".join(f"{v} {k}" for k, v in f["counts"].items() if v)]
            lines += [f"- {c['outcome']} {c['seconds']} s {c['test']}" + (f": {c['message'][:200]}" if c.get("message")
                                                                         else "") for c in f["tests"]]
        elif s["name"] == "memory" and isinstance(f, list):
            lines += ["", "## memory plan / measured", "", "| model | stage | quant | ckpt | batch x len | reference | "
                      "plan MiB | measured MiB | ratio |", "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
            lines += [f"| {r['model']} | {r['stage']} | {r['quantization']} | {r['gradient_checkpointing']} | "
                      f"{r['batch_size']} x {r['max_length']} | {r['reference'] or '-'} | "
                      f"{r['estimate_bytes'] / 2**20:.1f} | {r['measured_bytes'] / 2**20:.1f} | {r['ratio']} |"
                      for r in f]
        elif s["name"] == "bench_dora" and isinstance(f, dict) and f.get("rows"):
            lines += ["", f"## bench_dora ({f['env'].get('device')}, {f['env'].get('dtype')})", "",
                      "| hidden | quant | precision | dropout | variant | ms/step | x LoRA |",
                      "| ---: | --- | --- | ---: | --- | ---: | ---: |"]
            lines += [f"| {r.get('width')} | {r.get('quant')} | {r.get('precision')} | {r.get('dropout')} | "
                      f"{r.get('variant')} | {r.get('ms_per_step')} | {r.get('ratio_to_lora')} |" for r in f["rows"]]
    return "\n".join(lines) + "\n"


def cmd_run(args) -> int:
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # models and per-step files: big, and not for $OUT
    py = args.python or sys.executable
    # never a stage or a log-prob cache from an earlier run (the shared store, the evaluation's cache)
    env = {**os.environ, "PREFOPT_CACHE_DIR": str(work / "cache")}
    report = {"cpu": args.cpu, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget,
              "install_s": args.install_s, "steps": []}
    status = 0
    with open(out / "gpu_check.log", "w") as log:
        for step in plan(py, args.cpu, work):
            entry = {"name": step.name, "what": step.what}
            left = int(args.budget - (time.monotonic() - start))
            if step.skip:
                entry["status"] = f"skipped: {step.skip}"
            elif left < 15:
                entry["status"] = "not run: out of time"
                status = 1
            else:
                limit = min(step.limit, left)
                print(f"gpu_check: {step.name} (limit {limit} s): {step.what}", flush=True)
                entry["status"], seconds, entry["exit_code"] = run_step(step, limit, log, env)
                entry.update(seconds=round(seconds, 1), limit=limit, figures=figures(step, work))
                if step.name == "env" and entry["figures"]:
                    report["env"] = entry.pop("figures")
                counts = (entry["figures"] or {}).get("counts") if isinstance(entry.get("figures"), dict) else None
                if entry["status"] == "passed" and counts and not counts["passed"] and counts["skipped"]:
                    entry["status"] = "all skipped"  # (no CUDA seen, say): not a pass
                status |= entry["status"] != "passed"
                print(f"gpu_check: {step.name} {entry['status']} in {seconds:.0f} s", flush=True)
                with open(log.name, errors="replace") as f:  # this step's own output: all of env's (the versions)
                    f.seek(step.log_from)
                    lines = f.read().replace("\r", "\n").splitlines()
                print("\n".join("    " + t for t in (lines if step.name == "env" else lines[-12:]) if t.strip()),
                      flush=True)
            report["steps"].append(entry)
            report["seconds"] = round(time.monotonic() - start, 1)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
            (out / "summary.md").write_text(summary_md(report))
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {'all steps passed' if not status else 'SOME STEPS DID NOT PASS'} in "
          f"{time.monotonic() - start:.0f} s; {out}/summary.md, gpu_check.json, gpu_check.log", flush=True)
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the checks, each under its own limit")
    r.add_argument("--out", required=True)
    r.add_argument("--cpu", action="store_true", help="the CPU rehearsal: CUDA-only steps skipped, CPU sizes")
    r.add_argument("--budget", type=int, default=500, help="seconds for all steps together")
    r.add_argument("--python", default=None, help="the interpreter the steps run in (default: this one)")
    r.add_argument("--install-s", type=float, default=None, help="(recorded) seconds the wheels took to install")
    e = sub.add_parser("env", help="versions, requirements met, imports")
    e.add_argument("--json", required=True)
    args = ap.parse_args()
    return {"run": cmd_run, "env": cmd_env}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
