"""The wheels the lent GPU machine lacks: check, size and list them (scripts/gpu_wheels.sh), and name what an
interpreter has that the machine does not (the CPU rehearsal, scripts/gpu_check.sh --rehearse).

    python scripts/gpu_wheels.py check --dest .whl --python 3.12 --limit-mib 60 < list   # 'name==version|why' lines
    python scripts/gpu_wheels.py absent                     # installed here, not on the GPU machine

Standard library only (packaging from pip's own copy where it is not installed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE = ROOT / "scripts" / "gpu_machine.txt"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_tools():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip's own copy: always there where pip is
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def read_machine(path: Path) -> dict[str, str | None]:
    """scripts/gpu_machine.txt: {name: version or None where the version there is not on record}."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[norm(name)] = version or None
    return out


def wheel_meta(path: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the headers; the description follows a blank line
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key, []).append(value.strip())
    return norm(fields["Name"][0]), fields["Version"][0], fields.get("Requires-Dist", [])


def tree_bytes() -> int | None:
    """Tracked and untracked-not-ignored files: what travels to the device machine besides carried paths."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def cmd_check(args) -> int:
    Requirement, Version = requirement_tools()
    wanted = {}  # name -> (version, why)
    for line in sys.stdin.read().splitlines():
        if line.strip():
            spec, _, why = line.partition("|")
            name, _, version = spec.partition("==")
            wanted[norm(name)] = (version.strip(), why.strip())
    dest = Path(args.dest)
    have = {}
    for path in sorted(dest.glob("*.whl")):
        name, version, requires = wheel_meta(path)
        if wanted.get(name, (None,))[0] != version:
            print(f"  removed {path.name} (not on the list)")
            path.unlink()
            continue
        have[name] = (path, version, requires)
    machine = read_machine(Path(args.machine))
    env = {"python_version": args.python, "python_full_version": args.python + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    problems, notes, unverified = [], [], {}
    for name in wanted:
        if name not in have:
            problems.append(f"{name}=={wanted[name][0]}: no wheel in {dest}/ (did the download fail?)")
    total = 0
    print(f"{'wheel':64} {'MiB':>6}  why")
    for name, (path, version, requires) in have.items():
        size = path.stat().st_size
        total += size
        print(f"{path.name[:64]:64} {size / 2**20:6.2f}  {wanted[name][1]}")
        if name in machine:
            notes.append(f"{name} {version} shadows the machine's {name} {machine[name] or '(version not on record)'}")
        for spec in requires:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform's
            dep = norm(req.name)
            if dep in have:
                if not req.specifier.contains(Version(have[dep][1]), prereleases=True):
                    problems.append(f"{name} needs {spec}; {have[dep][1]} is shipped")
            elif dep in machine:
                if machine[dep] is None:
                    if str(req.specifier):
                        unverified.setdefault(dep, []).append(f"{name} {req.specifier}")
                elif not req.specifier.contains(Version(machine[dep]), prereleases=True):
                    problems.append(f"{name} needs {spec}; the machine has {machine[dep]}: ship {dep} too")
            else:
                problems.append(f"{name} needs {spec}, which the machine lacks: add it to WHEELS in "
                                "scripts/gpu_wheels.sh")
    limit = args.limit_mib * 2**20
    print(f"{'total (' + str(len(have)) + ' wheels)':64} {total / 2**20:6.2f}  limit {args.limit_mib:g} MiB")
    tree = tree_bytes()
    if tree is not None:
        print(f"working tree that travels with them: {tree / 2**20:.2f} MiB; together {(tree + total) / 2**20:.2f} "
              "of the device tool's 64 MiB")
        if tree + total > 64 * 2**20:
            problems.append("the working tree and the wheels exceed 64 MiB together")
    if total > limit:
        problems.append(f"the wheels take {total / 2**20:.2f} MiB, over the {args.limit_mib} MiB limit")
    for n in notes:
        print(f"  note: {n}")
    if unverified:
        print("  note: needed at these versions, on the machine at versions not on record (gpu_check.py env checks "
              "them there): " + "; ".join(f"{dep} ({', '.join(who)})" for dep, who in sorted(unverified.items())))
    for p in problems:
        print(f"  PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_absent(args) -> int:
    """Distributions installed in this interpreter that the GPU machine does not have (the rehearsal removes them)."""
    from importlib.metadata import distributions

    machine = read_machine(Path(args.machine))
    names = sorted({norm(d.metadata["Name"]) for d in distributions() if d.metadata["Name"]})
    print("\n".join(n for n in names if n not in machine and n not in ("pip", "setuptools", "wheel")))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check, size and list the wheels in --dest ('name==version|why' on stdin)")
    c.add_argument("--dest", required=True)
    c.add_argument("--python", default="3.12", help="the Python the wheels are for (their markers)")
    c.add_argument("--limit-mib", type=float, default=60)
    c.add_argument("--machine", default=str(MACHINE))
    a = sub.add_parser("absent", help="installed here, not on the GPU machine")
    a.add_argument("--machine", default=str(MACHINE))
    args = ap.parse_args()
    return {"check": cmd_check, "absent": cmd_absent}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
