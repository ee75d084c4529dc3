"""The house rules of prefopt/ (CONTRIBUTING.md), checked on the source: the import graph (every import statement,
those inside functions included) has no circle and no arrow back up the flow; other libraries' private or
experimental internals sit in two modules; the recipe's private fields stay in the config; one default, one cache
variable; no function over 80 lines; `import prefopt.cli` stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "prefopt"

# The flow, bottom to top: a module imports only modules of its own layer or of layers below it (within a layer,
# the graph has no circle either). recipe -> data -> stages -> eval -> merge -> report, then what composes them.
LAYERS = [
    ["prefopt.version", "prefopt.errors", "prefopt._compat", "prefopt.signals", "prefopt.hub", "prefopt.cachedir"],
    ["prefopt.console", "prefopt.config", "prefopt.advice"],
    ["prefopt.dist", "prefopt.quant", "prefopt.tracking"],
    ["prefopt.dora", "prefopt.runs"],
    ["prefopt.models"],
    ["prefopt.data"],
    ["prefopt.stages", "prefopt.memory"],
    ["prefopt.eval"],
    ["prefopt.merging"],
    ["prefopt.report"],
    ["prefopt.preflight"],
    ["prefopt.plan"],
    ["prefopt.steps"],
    ["prefopt.pipeline"],
    ["prefopt.sweep"],
    ["prefopt.api", "prefopt.cli", "prefopt.__main__", "prefopt"],
]
# Modules that import torch when they load: the only intra-package imports allowed inside a function (a fast --help)
HEAVY = ("prefopt.dora",)
# Other libraries' private or experimental internals: allowed only in these two modules
INTERNALS_HOMES = {"prefopt/_compat.py", "prefopt/dora/forward.py"}
INTERNALS = re.compile(
    r"trl\.experimental|torch\._C\b|_current_graph_task_id|_forward_hooks|_forward_pre_hooks|_hf_hook|"
    r"fix_4bit_weight_quant_state_from_module|set_compute_type|compute_type_is_set|support_avx512bf16_for_cpu|"
    r"packing_format_for_cpu|\.precompute_ref_logps\b|_active_adapter\b|_disable_adapters|_cast_input_dtype|"
    r"DoraLinearVariant|__class__ = |transformers\.integrations|peft\.tuners|peft\.utils\.integrations|"
    r"\._parameters\b|\._buffers\b|\._modules\b|lm_eval\.__file__")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported prefopt module, inside a function?) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - (node.level - (1 if is_pkg else 0))]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                yield t, id(node) in inner


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py: place it in the flow"
    return best[0]


EDGES = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def test_no_import_circle():
    graph = {m: {t for t, _ in e} for m, e in EDGES.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_every_import_points_down_the_flow():
    back = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
            for m, edges in EDGES.items() for t, _ in edges if _layer(t) > _layer(m)]
    assert not back, "arrows back up the flow:\n" + "\n".join(back)


def test_intra_package_imports_sit_at_the_top_unless_heavy():
    inner = [f"{m} imports {t} inside a function" for m, edges in EDGES.items() for t, in_function in edges
             if in_function and not t.startswith(HEAVY)]
    assert not inner, "\n".join(inner)


def _code_lines(path: Path) -> list[str]:
    """The module's lines with every string and comment blanked out (code only, line numbers kept)."""
    lines = path.read_text().splitlines()
    with path.open() as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    for tok in reversed(tokens):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                line = lines[r - 1]
                start = c0 if r == r0 else 0
                end = c1 if r == r1 else len(line)
                lines[r - 1] = line[:start] + " " * (end - start) + line[end:]
    return lines


def test_other_libraries_internals_sit_in_two_modules():
    found = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel in INTERNALS_HOMES:
            continue
        for i, code in enumerate(_code_lines(path), 1):
            if INTERNALS.search(code):
                found.append(f"{rel}:{i}: {code.strip()}")
    assert not found, "move these to prefopt/_compat.py:\n" + "\n".join(found)


def test_the_recipes_private_fields_are_read_only_in_the_config():
    found = [f"{p.relative_to(ROOT)}:{i}" for p in PKG.rglob("*.py") if "config" not in p.relative_to(PKG).parts
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\._(base_dir|lines|source|overrides)\b", line)]
    assert not found, found


def test_no_function_over_80_lines():
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long, long


def test_one_cache_folder_and_one_variable():
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"PREFOPT_CACHE\b(?!_DIR)", text), f"{p}: the old PREFOPT_CACHE variable"
        if p.name != "cachedir.py":
            assert '"PREFOPT_CACHE_DIR"' not in text, f"{p}: read the cache folder from prefopt.cachedir"


def test_defaults_are_the_schemas():
    """The CLI, the Python API and the library read their defaults from the recipe schema (one place)."""
    import inspect

    from click.testing import CliRunner

    from prefopt.cli import main
    from prefopt.config import AdapterSection, MergeSection, ModelSection, defaults
    from prefopt.merging.stream import Thresholds, merge_adapter
    from prefopt.models import ModelSpec, build_lora_config

    merge, adapter, model = defaults(MergeSection), defaults(AdapterSection), defaults(ModelSection)
    t = Thresholds()
    assert (t.max_rel_logit_diff, t.mean_kl, t.min_top1_agreement) == (
        merge["max_rel_logit_diff"], merge["mean_kl"], merge["min_top1_agreement"])
    help_text = CliRunner().invoke(main, ["merge", "--help"]).output
    for flag, key in (("--max-rel-logit-diff", "max_rel_logit_diff"), ("--mean-kl", "mean_kl"),
                      ("--min-top1-agreement", "min_top1_agreement")):
        assert re.search(rf"{flag} FLOAT.*?\[default: {re.escape(str(merge[key]))}\]", help_text, re.S), flag
    cfg = build_lora_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.use_dora) == (
        adapter["r"], adapter["alpha"], adapter["dropout"], adapter["target_modules"], adapter["method"] == "dora")
    spec = ModelSpec("m")
    assert (spec.quantization, spec.dtype, spec.quant_storage, spec.dora_impl, spec.dora_dropout) == (
        model["quantization"], model["dtype"], model["quant_storage"], adapter["dora_impl"], adapter["dora_dropout"])
    params = inspect.signature(merge_adapter).parameters
    assert (params["base_mode"].default, params["out_dtype"].default, params["verify_merge"].default) == (
        merge["base"], merge["dtype"], merge["verify"])


def test_the_cli_imports_no_heavy_library():
    """`prefopt --help` answers at once: importing the CLI loads neither torch nor transformers, trl or peft."""
    code = ("import sys, prefopt.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_checks_can_fail(tmp_path):
    """A module that imports upward, or reads a private TRL attribute, is caught."""
    assert _layer("prefopt.data.prepare") < _layer("prefopt.steps.train")
    assert INTERNALS.search("trainer.precompute_ref_logps = True")
    assert INTERNALS.search("from trl.experimental.orpo import ORPOConfig")
    assert not INTERNALS.search("precompute_ref_log_probs=True")
    code = tmp_path / "c.py"
    code.write_text('x = "trl.experimental in a string"  # trl.experimental in a comment\nimport trl.experimental\n')
    assert [bool(INTERNALS.search(line)) for line in _code_lines(code)] == [False, True]
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from ..pipeline import run\n")
    MODULES["prefopt.data.sample"] = sample
    try:
        edges = list(_imports("prefopt.data.sample", sample))
    finally:
        del MODULES["prefopt.data.sample"]
    assert edges == [("prefopt.pipeline", True)] and _layer("prefopt.pipeline") > _layer("prefopt.data.sample")


def test_the_user_cache_is_one_folder(tmp_path, monkeypatch):
    """$PREFOPT_CACHE_DIR moves the whole user cache (stages, reference log-probs, eval, logs); 'off' turns the
    shared store off and leaves the rest in the default folder."""
    from prefopt.cachedir import cache_root
    from prefopt.console import log_dir
    from prefopt.eval.run import cache_dir as eval_cache
    from prefopt.runs.store import shared_dir

    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and shared_dir(None) == tmp_path / "c"
    assert eval_cache() == tmp_path / "c" / "eval" and log_dir() == tmp_path / "c" / "logs"
    assert shared_dir(str(tmp_path / "mine")) == tmp_path / "mine" and shared_dir("off") is None
    monkeypatch.setenv("PREFOPT_CACHE_DIR", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shared_dir(None) is None and cache_root() == tmp_path / "home" / ".cache" / "prefopt"


def test_every_folder_is_a_package():
    """A folder without __init__.py is a namespace package: an editable install finds it, a wheel does not."""
    missing = [str(d.relative_to(ROOT)) for d in [PKG, *PKG.rglob("*")] if d.is_dir() and d.name != "__pycache__"
               and any(d.glob("*.py")) and not (d / "__init__.py").is_file()]
    assert not missing, missing
