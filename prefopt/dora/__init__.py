"""prefopt's exact low-rank DoRA forward for PEFT's DoRA layers (the maths: docs/dora.md).

`forward.py` swaps a PEFT DoRA layer's forward for one that never builds the dense weight update; `ops.py` holds
its autograd functions (the column norm, the 4-bit weight shared between forward and backward). Both import torch
at module level: import this package inside the functions that need it.
"""

from .forward import clear_norm_cache, disable_fast_dora, enable_fast_dora, fast_dora_layers, path_counts

__all__ = ["clear_norm_cache", "disable_fast_dora", "enable_fast_dora", "fast_dora_layers", "path_counts"]
