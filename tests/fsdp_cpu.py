"""`prefopt` under accelerate's FSDP on CPU (gloo), for the tests.

accelerate routes FSDP only on accelerators: with `use_cpu` it picks plain multi-CPU data parallelism whatever the
config says (its GPU branch of `AcceleratorState.__init__` is the only one that looks at the FSDP plugin). torch's
FSDP2 (`fully_shard`) itself runs on CPU with gloo, so this shim takes the GPU branch's three steps for the CPU --
distributed type FSDP, the plugin, its mixed-precision policy -- and everything after it is the code a GPU run takes:
accelerate's fsdp2 preparation, DTensor shards of every weight (4-bit ones included), the trainer's sharded
checkpoints, prefopt's gathered adapter save. It also prints, once per rank and stage, what the shards were, so a test
can tell FSDP really ran. Launch: ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/... \
tests/fsdp_cpu.py run RECIPE.
"""

from __future__ import annotations

import json
import os
import sys

from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _cpu_fsdp_init(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _cpu_fsdp_init

from prefopt.stages import common  # noqa: E402

_gather = common.gathered_adapter_state


def _gather_and_say(model, **kwargs):
    params = list(model.parameters())
    shards = [p for p in params if type(p).__name__ == "DTensor"]
    print("fsdp-cpu: " + json.dumps({
        "rank": int(os.environ.get("RANK", "0")), "params": len(params), "dtensors": len(shards),
        "local": sum(p.to_local().numel() for p in shards), "full": sum(p.numel() for p in shards),
        "classes": sorted({type(m).__name__ for m in model.modules()})}), file=sys.stderr, flush=True)
    return _gather(model, **kwargs)


common.gathered_adapter_state = _gather_and_say

if __name__ == "__main__":
    from prefopt.cli import main

    sys.exit(main(sys.argv[1:]))
