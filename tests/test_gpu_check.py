"""scripts/gpu_check.py on CPU: the GPU steps fit one device call, a step over its limit is killed with its
children; scripts/gpu_wheels.py names a requirement the GPU machine lacks."""

import subprocess
import sys
import time
import zipfile

import gpu_check
from conftest import ROOT

INSTALL_ALLOWANCE_S = 40  # pip install --target of .whl/ (bitsandbytes unpacks ~130 MB) before the steps


def test_gpu_steps_fit_one_device_call(tmp_path):
    steps = gpu_check.plan("python3", cpu=False, work=tmp_path)
    # bench_dora first after env: the unquantized autocast row is the one issue 26 needs a GPU figure for
    assert [s.name for s in steps] == ["env", "bench_dora", "gpu_tests", "nf4_chain", "memory"]
    bench = next(s for s in steps if s.name == "bench_dora").cmd
    assert bench[bench.index("--quant") + 1] == "none" and bench[bench.index("--precision") + 1] == "autocast"
    assert sum(s.limit for s in steps) + INSTALL_ALLOWANCE_S <= 540  # 9 minutes of a 10-minute command
    gpu_tests = (ROOT / "tests" / "test_gpu.py").read_text()
    for step in steps:
        for arg in step.cmd:
            if arg.startswith(("tests/", "scripts/")):
                assert (ROOT / arg).is_file(), arg
    assert "def test_nf4_sft_dpo_merge_half_billion" in gpu_tests  # what -k half_billion selects


def test_rehearsal_skips_only_the_cuda_steps(tmp_path):
    steps = {s.name: s for s in gpu_check.plan("python3", cpu=True, work=tmp_path)}
    assert [n for n, s in steps.items() if s.skip] == ["nf4_chain"]
    assert "--collect-only" in steps["gpu_tests"].cmd
    assert all("cuda" not in s.cmd for s in steps.values())


def test_a_step_over_its_limit_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "late"
    cmd = ["bash", "-c", f"(sleep 3; touch {marker}) & sleep 30"]
    t = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        status, seconds, code = gpu_check.run_step(gpu_check.Step("s", "sleeps", 1, cmd), 1, log, env=None)
    assert status == "timed out" and code is None and time.monotonic() - t < 5
    time.sleep(3)
    assert not marker.exists(), "the step's child outlived its limit"


def _wheel(folder, name, version, requires=()):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires), "\nbody\n"])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def _check(dest, machine, specs):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), "check", "--dest", str(dest),
                           "--machine", str(machine), "--limit-mib", "1"], input="\n".join(specs),
                          capture_output=True, text=True)


def test_wheel_check_names_what_the_machine_lacks(tmp_path):
    dest, machine = tmp_path / "whl", tmp_path / "machine.txt"
    dest.mkdir()
    machine.write_text("# the machine\nnumpy==2.0.0\nscipy\n")
    _wheel(dest, "alpha", "1.0", ["beta>=2", "numpy>=1.17", "scipy>=1", 'gamma; extra == "test"',
                                  'delta; python_version < "3.8"'])
    _wheel(dest, "stale", "0.1")
    proc = _check(dest, machine, ["alpha==1.0|why alpha"])
    assert proc.returncode == 1
    assert "alpha needs beta>=2, which the machine lacks" in proc.stderr
    assert "gamma" not in proc.stderr and "delta" not in proc.stderr  # an extra, another Python
    assert "removed stale-0.1" in proc.stdout and not (dest / "stale-0.1-py3-none-any.whl").exists()
    assert "scipy (alpha >=1)" in proc.stdout  # on the machine, its version not on record: checked there

    _wheel(dest, "beta", "2.5")
    proc = _check(dest, machine, ["alpha==1.0|why alpha", "beta==2.5|needed by alpha"])
    assert proc.returncode == 0, proc.stderr
    assert "why alpha" in proc.stdout and "total (2 wheels)" in proc.stdout

    machine.write_text("numpy==1.16.0\nscipy\n")  # a version on record that is too old: ship it too
    proc = _check(dest, machine, ["alpha==1.0|why alpha", "beta==2.5|needed by alpha"])
    assert proc.returncode == 1 and "the machine has 1.16.0: ship numpy too" in proc.stderr
