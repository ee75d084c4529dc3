"""prefopt's exact low-rank DoRA forward for PEFT's DoRA layers (the maths: docs/dora.md).

`forward.py` swaps a PEFT DoRA layer's forward for one that never builds the dense weight update; `ops.py` holds
its autograd functions (the column norm, the 4-bit weight shared between forward and backward); `zero_rows.py`
finds base rows of norm 0 and makes PEFT's DoRA safe for them (the fast forward always is). All import torch
at module level: import this package inside the functions that need it.
"""

from .forward import clear_norm_cache, disable_fast_dora, enable_fast_dora, fast_dora_layers, path_counts
from .zero_rows import find_zero_rows, guard_zero_rows, zero_rows_in_checkpoint, zero_rows_note

__all__ = ["clear_norm_cache", "disable_fast_dora", "enable_fast_dora", "fast_dora_layers", "find_zero_rows",
           "guard_zero_rows", "path_counts", "zero_rows_in_checkpoint", "zero_rows_note"]
