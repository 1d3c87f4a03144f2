"""Several processes, one run: the accelerator a recipe runs on and the steps every process must take together.

`accelerate launch` decides the topology: one process, DDP, or FSDP2, on GPUs, or on CPUs (torchrun processes that
join with gloo). Three facts of accelerate 1.x that hf_dynorm works around here, each tested on 2 CPU processes:

- an FSDP launch on a machine without an accelerator silently becomes MULTI_CPU (plain DDP: `Accelerator(cpu=True)`
  never upgrades to FSDP). `make_accelerator` restores FSDP2 (`fully_shard` runs on CPU with gloo), so the FSDP
  path that runs on GPUs is the one the CPU tests run;
- a `mixed_precision` passed to `Accelerator` wins over the launch config's; it is passed only when the recipe or
  the command line set it, and `precision_source` says which won;
- FSDP's mixed-precision policy casts every parameter of a unit to bf16 for the forward, DyISRU's `log_kappa`
  included (its exp then moves in ~13% steps); `shard_norms_in_fp32` makes each norm site a unit of its own that
  computes in fp32.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn


def launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def precision_source(config) -> tuple[str | None, str]:
    """(the mixed_precision to pass to Accelerator, where it comes from): the recipe's or the command line's when
    set, else None, which lets accelerate read the launch config (ACCELERATE_MIXED_PRECISION)."""
    if config.mixed_precision is not None:
        return config.mixed_precision, config.sources.get("mixed_precision", "the caller")
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None, "accelerate launch config"
    return None, "default (no mixed precision)"


def make_accelerator(config, project_dir: str):
    """The Accelerator of a distillation run (see the module docstring for what it corrects)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        FullyShardedDataParallelPlugin,
        ProjectConfiguration,
    )

    mixed_precision, _ = precision_source(config)
    accelerator = Accelerator(
        # without an accelerator, torchrun-launched processes join as MULTI_CPU (gloo)
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=config.report_to if config.report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=project_dir, automatic_checkpoint_naming=False),
        # sites waiting for their ramp leave their parameters unused in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if launched_with_fsdp() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # the launch config's fsdp_config, from the environment
        if plugin.fsdp_version != 2:
            raise ValueError("hf_dynorm runs FSDP2 only: set fsdp_version: 2 in the accelerate config's fsdp_config")
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("hf_dynorm runs FSDP2 only: set fsdp_version: 2 in the accelerate config's fsdp_config")
    return accelerator


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def training_dtype(accelerator) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def shard_norms_in_fp32(modules: list[nn.Module], accelerator) -> None:
    """FSDP: each module (a norm site) its own unit whose parameters compute in fp32 whatever the run's policy, and
    whose inputs keep their dtype (a bf16 residual stream stays bf16 for the next matmul). Before `prepare`, which
    then leaves these parameters out of the enclosing layer's unit."""
    if not is_fsdp(accelerator):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for module in modules:
        fully_shard(module, mp_policy=policy, reshard_after_forward=accelerator.state.fsdp_plugin.reshard_after_forward)


def place_frozen(model: nn.Module, accelerator) -> nn.Module:
    """A frozen model (full mode's teacher) in the training dtype: sharded like the student under FSDP, else one copy
    per process on its device. It is not `prepare`d: no gradients to synchronise, and no place in checkpoints."""
    model = model.to(dtype=training_dtype(accelerator)).eval().requires_grad_(False)
    if is_fsdp(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model.to(accelerator.device))
    return model.to(accelerator.device)


def broadcast(obj, accelerator):
    """`obj` of the main process, on every process (pickled; for small objects such as calibrated parameters)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj if accelerator.is_main_process else None], from_process=0)[0]


def gather(obj, accelerator) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if accelerator.num_processes == 1:
        return [obj]
    output = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(output, obj)
    return output


def all_finite(value: torch.Tensor, accelerator) -> bool:
    """Whether `value` is finite on every process: one decision for all, so that no process skips a backward (and its
    gradient all-reduce) that the others run."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory; buffers are copied): the shape into which
    a gathered full state dict is loaded at the end of a run, taken before `prepare` changes the model."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def sharded_fraction(model: nn.Module) -> dict:
    """This process's share of the parameter elements (1.0 without sharding): what proves FSDP ran."""
    from torch.distributed.tensor import DTensor

    total = local = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return {"local_parameter_elements": local, "parameter_elements": total,
            "dtensor_parameters": sum(isinstance(p, DTensor) for p in model.parameters())}


def describe(accelerator, config) -> dict:
    """The topology and precision of a run, for its log and results.json."""
    _, source = precision_source(config)
    return {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
            "mixed_precision": accelerator.mixed_precision, "mixed_precision_source": source,
            "device": str(accelerator.device)}
