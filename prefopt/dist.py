"""Several processes (torchrun / accelerate launch): who writes, who waits, and one decision for all.

Launched by torchrun or `accelerate launch`, every rank runs the same `prefopt run`; the trainers do the data
parallelism. prefopt's own rule: only the main process writes the run folder, the manifest, W&B runs, data reports,
evaluation outputs and the merge; the others wait at barriers, and every decision that reads the run folder (skip,
reuse, resume) is made on the main process and broadcast, so ranks never disagree. A single process is the
degenerate case: every function here is then a no-op or the identity.
"""

from __future__ import annotations

import os

from . import console, errors
from .errors import PrefoptError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """The process group, before anything else needs it (gloo on CPU, nccl with GPUs); each rank's own GPU."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as td

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not td.is_initialized():
        import datetime

        # the other ranks wait while the main process evaluates and merges: minutes to hours for a large model
        minutes = float(os.environ.get("PREFOPT_DIST_TIMEOUT_MIN", "240"))
        td.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                              timeout=datetime.timedelta(minutes=minutes))


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as td

        if td.is_initialized():
            td.barrier()


def broadcast(obj):
    """The main process's value of obj, on every rank."""
    if world_size() <= 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a decision made per rank, made the same everywhere)."""
    if world_size() <= 1:
        return flag
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device="cuda" if td.get_backend() == "nccl" else "cpu")
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def on_main_then_share(fn, *args, **kwargs):
    """Run fn on the main process (which writes), then hand its result -- or its error -- to every rank."""

    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # every rank must learn of it, or the others wait forever
            error = e
    kind = None if error is None else "user" if isinstance(error, PrefoptError) else \
        "interrupt" if isinstance(error, KeyboardInterrupt) else "bug"
    shared = broadcast((result, kind, str(error) if error is not None else None,
                        type(error).__name__ if error is not None else None))
    if error is not None:
        raise error
    if shared[1] == "user":

        cls = getattr(errors, shared[3] or "", None)  # the same kind of user error (a failed gate exits 3 everywhere)
        if isinstance(cls, type) and issubclass(cls, PrefoptError) and cls.__init__ is Exception.__init__:
            raise cls(shared[2])
        raise PrefoptError(shared[2])
    if shared[1] == "interrupt":
        raise KeyboardInterrupt()
    if shared[1] == "bug":
        raise RuntimeError(f"the main process failed: {shared[2]}")
    return shared[0]


def _zero_stage() -> int | None:
    """The ZeRO stage accelerate launch was given: in its config, or in the DeepSpeed config file it names."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        import json

        try:
            with open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError):
            return None  # accelerate itself says what is wrong with the file
    try:
        return int(stage) if stage is not None else None
    except ValueError:
        return None


def launcher_problems(*, quantization: str, quant_storage: str, quant_key: str, storage_key: str) -> list[str]:
    """What the accelerate config asks for that prefopt cannot do right, said before any model loads. (accelerate
    launch hands its config to the processes as environment variables.)"""
    env = os.environ
    problems = []
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and _zero_stage() == 3:
        if quantization != "none":
            problems.append(f"{quant_key}: {quantization} under DeepSpeed ZeRO-3: DeepSpeed partitions only "
                            "weights it creates itself (zero.Init), and prefopt loads every stage's base whole, so "
                            "the quantized weights would not be partitioned (seen: 'Params4bit' object has no "
                            "attribute 'ds_status'); shard a quantized base with FSDP "
                            "(recipes/accelerate/fsdp_qlora.yaml), or use quantization: none")
        if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
            problems.append("accelerate config: zero3_init_flag true: prefopt loads every stage's base whole (the "
                            "same way in every stage, and for the merge) and DeepSpeed partitions it when training "
                            "starts; set zero3_init_flag: false (as recipes/accelerate/zero3.yaml does)")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return problems
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        problems.append(f"accelerate config: fsdp_version {version}: prefopt runs FSDP version 2 (fully_shard), the "
                        "one its adapter save and DoRA forward are tested under; set fsdp_version: 2 (as "
                        "recipes/accelerate/fsdp_qlora.yaml does)")
    if quantization == "int8":
        problems.append(f"{quant_key}: int8 under FSDP: bitsandbytes' 8-bit weights cannot be sharded (seen: "
                        "'Creating a Parameter from an instance of type Int8Params requires ...'); use nf4 with "
                        "quant_storage bfloat16, or quantization: none")
    if quantization == "nf4" and quant_storage == "uint8":
        problems.append(f"{storage_key}: uint8 (the default) keeps the 4-bit base weights out of FSDP's shards (every "
                        "process would hold all of them); set model.quant_storage to a float type: bfloat16 on GPUs "
                        "(float32 works too; the numbers are the same)")
    return problems


# torchrun's and accelerate launch's variables: a child without them is a process of its own, outside the group
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_", "TORCH_NCCL_", "PET_")


def run_alone(args: list[str]) -> int:
    """`python -m prefopt ARGS` as a single process of its own (outside the process group, on this process's GPU),
    from the main process while the others wait; its exit code. For work whose libraries issue collectives of their
    own when they see a launcher (lm-eval, generation)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    env["CUDA_VISIBLE_DEVICES"] = devices[local_rank()] if devices and local_rank() < len(devices) else \
        str(local_rank()) if visible is None else visible
    # under a captured console (console.captured) the child speaks to the console, and captures its own log
    fd = console.stream().fileno() if console.run_log() is not None else None
    return subprocess.run([sys.executable, "-m", "prefopt", *args], env=env, stdout=fd, stderr=fd).returncode
