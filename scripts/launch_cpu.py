"""`prefopt` under accelerate's FSDP or DeepSpeed on CPU (gloo), for the tests and scripts/measure_memory.py.

accelerate routes FSDP and DeepSpeed only on accelerators: with `use_cpu` it picks plain multi-CPU data parallelism
whatever the config says (only its accelerator branch of `AcceleratorState.__init__` looks at the FSDP or DeepSpeed
plugin). torch's FSDP2 (`fully_shard`) runs on CPU with gloo, and so does DeepSpeed with its CPU accelerator
(DS_ACCELERATOR=cpu), so this shim takes that branch's steps for the CPU -- the distributed type, the plugin, its
mixed precision (and, for DeepSpeed, its communication setup) -- and everything after it is the code a GPU run takes:
accelerate's fsdp2 / deepspeed preparation, every weight a DTensor shard or a ZeRO-3 partition (4-bit ones
included), the trainer's sharded checkpoints, prefopt's gathered adapter save. It also writes, once per rank and
stage, what the shards were (to $LAUNCH_CPU_REPORT/rank<N>.jsonl), so a test can tell the sharding really
ran. Launch:

    ACCELERATE_USE_CPU=true [DS_ACCELERATOR=cpu] accelerate launch --config_file recipes/accelerate/X.yaml \
        scripts/launch_cpu.py run RECIPE
"""

from __future__ import annotations

import json
import os
import sys

from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _cpu_init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:
        from deepspeed import comm

        if not comm.is_initialized():  # accelerate's PartialState does this for DeepSpeed on accelerators
            comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
        self._mixed_precision = "no"  # DeepSpeed handles it
    else:
        return
    PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _cpu_init

from prefopt.stages import common  # noqa: E402

_gather = common.gathered_adapter_state


def _gather_and_say(model, **kwargs):
    if "LAUNCH_CPU_REPORT" not in os.environ:
        return _gather(model, **kwargs)
    params = list(model.parameters())
    dtensors = [p for p in params if type(p).__name__ == "DTensor"]
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    line = json.dumps({
        "rank": int(os.environ.get("RANK", "0")), "params": len(params), "sharded": len(dtensors) + len(zero3),
        "local": sum(p.to_local().numel() for p in dtensors) + sum(p.ds_tensor.numel() for p in zero3),
        "full": sum(p.numel() for p in dtensors) + sum(p.ds_numel for p in zero3),
        "classes": sorted({type(m).__name__ for m in model.modules()})})
    with open(os.path.join(os.environ["LAUNCH_CPU_REPORT"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(line + "\n")  # a file per rank: the ranks' stderr lines interleave
    return _gather(model, **kwargs)


common.gathered_adapter_state = _gather_and_say

if __name__ == "__main__":
    from prefopt.cli import main

    sys.exit(main(sys.argv[1:]))
