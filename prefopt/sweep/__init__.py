"""`prefopt sweep`: a grid of recipe values, one run folder per point, shared stages trained once (see run.py)."""

from .run import SWEEP_CSV, SWEEP_HTML, SWEEP_JSON, Prepared, SweepIncomplete, SweepResult, prepare, run_sweep
from .spec import SweepSpec, grid_values, parse_grid_item, parse_set_items, read_sweep_file

__all__ = ["SWEEP_CSV", "SWEEP_HTML", "SWEEP_JSON", "Prepared", "SweepIncomplete", "SweepResult", "SweepSpec",
           "grid_values", "parse_grid_item", "parse_set_items", "prepare", "read_sweep_file", "run_sweep"]
