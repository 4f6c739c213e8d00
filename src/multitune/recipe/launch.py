"""Launching on one process or several: accelerate's Accelerator, FSDP sharding or DeepSpeed ZeRO, and what
each of them refuses."""

from __future__ import annotations

from typing import Any

import torch

from multitune.balancing.backward import GRADIENT_SOURCES, Balancer
from multitune.balancing.gradients import GramianAggregator
from multitune.config import Config, TrainingConfig
from multitune.core.processes import Processes
from multitune.errors import ConfigError
from multitune.models.adapters.base import ADAPTERS
from multitune.models.architectures import ARCHITECTURES
from multitune.training.schedules import SCHEDULES
from multitune.training.zero import (
    ZeroAccelerator,
    ZeroSettings,
    check_zero,
    import_deepspeed,
    zero_from_accelerate,
)


def fresh_accelerator(mixed_precision: str, cpu: bool = False) -> Any:
    """accelerate's Accelerator for one run, with this run's mixed precision and device. accelerate keeps
    its state for the whole process: a second run in the same process (multitune.fit twice in a notebook,
    the runs of a test session) would be refused another mixed precision, or silently keep the first run's
    when it names none. So each run starts from a clean AcceleratorState; the process group (PartialState)
    is kept where several processes were launched, and rebuilt otherwise."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=int(os.environ.get("WORLD_SIZE", "1")) <= 1)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def build_accelerator(training: TrainingConfig) -> tuple[Any, bool, ZeroSettings | None]:
    """accelerate's Accelerator (launched as several processes without a GPU, they train on CPUs, gloo);
    whether the backbone is to be sharded (training.fsdp, or an accelerate config asking for FSDP: multitune
    shards it itself, training/distributed.py); and the DeepSpeed ZeRO settings (training.deepspeed, or an
    accelerate DeepSpeed config: multitune drives the engine itself, training/zero.py)."""
    import os

    several_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    zero = zero_from_accelerate()
    if training.deepspeed is not None:  # the run's own config wins
        zero = ZeroSettings(training.deepspeed.stage, training.deepspeed.offload_optimizer)
    if zero is not None:
        check_zero(zero, training)
        import_deepspeed()  # accelerate's DeepSpeed state needs it, and its CPU accelerator without a GPU
    accelerator = fresh_accelerator(training.mixed_precision, cpu=several_cpus)
    engine = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if engine == "DEEPSPEED":  # with a GPU: accelerate would drive an engine of its own
        accelerator = ZeroAccelerator(accelerator, training.mixed_precision)
    elif engine == "MEGATRON_LM":
        raise ConfigError(
            "accelerate is configured for MEGATRON_LM, which multitune does not drive: use data parallel, "
            "training.fsdp=true or DeepSpeed ZeRO"
        )
    if zero is not None and engine == "FSDP":
        raise ConfigError("choose one of FSDP and DeepSpeed ZeRO", field=zero.source)
    return accelerator, engine == "FSDP", zero


def check_distributed(config: Config, balancer: Balancer, batch_size: int, group: Processes) -> None:
    """What training on several processes needs (training/distributed.py)."""
    if batch_size < group.world:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch: it needs at least one row per process ({group.world})",
            field="training.batch_size",
        )
    aggregator = balancer.aggregator
    if group.sharded:
        check_sharded(config, balancer)
    partial = not GRADIENT_SOURCES.capabilities(balancer.source).whole_gradients  # each process: its own rows' part
    if partial and aggregator is not None and not isinstance(aggregator, GramianAggregator):
        name = config.gradient_aggregation.name if config.gradient_aggregation else ""
        raise ConfigError(
            f"with several processes, '{name}' needs the parameters source (on the representation source only"
            " the Gramian-based methods are exact)",
            field="gradient_aggregation.source",
        )


def check_sharded(config: Config, balancer: Balancer) -> None:
    """What a sharded backbone (FSDP) does not support: methods that declare `sharded=False` (they need whole
    per-task gradients of the shared weights, run the backbone layer by layer or keep one per task: FSDP2
    gathers a unit's weights only when that unit's own forward runs), schedules that write the weights
    outside the optimizer step, and the features that copy or probe whole weights."""
    training, model = config.training, config.model
    source = GRADIENT_SOURCES.capabilities(balancer.source)
    refused = {
        "gradient_aggregation.source": balancer.aggregator is not None and not source.sharded,
        "model.architecture.name": not ARCHITECTURES.capabilities(model.architecture.name).sharded,
        "analysis.task_affinity": config.analysis.task_affinity,
        "guard.enabled": config.guard.enabled,
        "training.schedule.name": SCHEDULES.capabilities(training.schedule.name).writes_weights,
        "regularization": bool(config.regularization.l2_sp_alpha or config.regularization.l2_sp_beta),
        "model.peft": model.peft is not None and not ADAPTERS.capabilities(model.peft.method).sharded,
        "training.compile": training.compile,
    }
    for field, on in refused.items():
        if on:
            raise ConfigError("not available with a sharded backbone (FSDP) yet", field=field)
