"""DeepSpeed ZeRO (stages 1 and 2) under multitune's own loop, on several processes.

DeepSpeed's engine owns gradient reduction and the optimizer step; multitune's balancers own the backward
(they write every parameter's `.grad` from weighted or aggregated per-task gradients, already summed over
the processes: training/distributed.py). The two meet in `ZeroOptimizer.step`: the gradient each parameter
holds is handed to the engine as the gradient of the surrogate loss Σ_p ⟨p, g_p⟩ (its gradient with respect
to p is g_p) through `engine.backward`, so DeepSpeed's own hooks reduce and partition it, and `engine.step`
updates this process's 1/P of the fp32 master weights and of the AdamW state, then gathers the weights.
Every sampler, loss weighting and gradient method therefore runs under ZeRO unchanged.

- Stage 1 partitions the optimizer state, stage 2 the gradients as well; `offload_optimizer: cpu` keeps the
  partition (and its step) in host memory. Stage 3 partitions the parameters themselves, which the
  balancers read whole: `training.fsdp` shards parameters instead.
- Mixed precision stays multitune's (autocast); the module keeps fp32 weights, so DeepSpeed's master copy
  equals them and a checkpoint's safetensors are exact.
- DeepSpeed steps flat buffers: a parameter without a gradient in a step (the head of a task that was not
  drawn) still takes an AdamW step with a zero gradient (its momentum carries on, weight decay applies),
  where torch's AdamW skips it. With every task in every step (`all_tasks` sampling or mixed batches) the
  updates are the single-process ones.
- Checkpoints stay whole: the AdamW state is gathered parameter by parameter
  (deepspeed.utils.safe_get_full_optimizer_state) into torch AdamW's own state_dict format, so a ZeRO run
  resumes on any number of processes, with or without DeepSpeed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from multitune.errors import ConfigError
from multitune.training.schedules import SCHEDULES


@dataclass(frozen=True)
class ZeroSettings:
    stage: int = 2
    offload_optimizer: str = "none"  # or "cpu"
    source: str = field(default="training.deepspeed", compare=False)  # where they were set, for errors


def zero_from_accelerate(environ: Mapping[str, str] = os.environ) -> ZeroSettings | None:
    """The ZeRO settings of an accelerate DeepSpeed config, as `accelerate launch` passes them to the processes
    (its own deepspeed fields, or a DeepSpeed JSON file); None without one. Read from the environment, because
    accelerate's state falls back to plain multi-CPU data parallelism without a GPU."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if file and file != "none":
        try:
            zero = json.loads(Path(file).read_text(encoding="utf-8")).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError) as error:
            raise ConfigError(f"cannot read the DeepSpeed config: {error}", file=file) from None
        offload = zero.get("offload_optimizer")
        device = offload.get("device", "none") if isinstance(offload, dict) else "none"
        stage = zero.get("stage", 0)
    else:
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        device = environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    if str(stage) == "0":  # no partitioning: plain data parallelism, which multitune does itself
        return None
    if device not in ("none", "cpu"):
        raise ConfigError(f"optimizer offload to '{device}': multitune drives offload to the CPU only", file=file)
    try:
        return ZeroSettings(int(stage), device, source="accelerate config (deepspeed_config)")
    except ValueError:
        raise ConfigError(f"ZeRO stage {stage!r} is not a number", file=file) from None


def check_zero(settings: ZeroSettings, training: Any) -> None:
    """What multitune's ZeRO does not drive: stage 3, fp16, FSDP on top, and the schedules that write the
    weights outside the optimizer step (DeepSpeed's fp32 master copy would not see them)."""
    where = settings.source
    if settings.stage == 3:
        raise ConfigError(
            "ZeRO stage 3 partitions the parameters, which multitune's balancing reads whole; use stage 1 or 2, "
            "or training.fsdp=true to shard the backbone's parameters",
            field=where,
        )
    if settings.stage not in (1, 2):
        raise ConfigError(f"ZeRO stage {settings.stage}: multitune drives stages 1 and 2", field=where)
    if training.fsdp:
        raise ConfigError("choose one of FSDP and DeepSpeed ZeRO", field=where)
    if training.mixed_precision == "fp16":
        raise ConfigError("DeepSpeed ZeRO here trains in fp32 or bf16 autocast", field="training.mixed_precision")
    schedule = training.schedule.name
    if SCHEDULES.capabilities(schedule).writes_weights:
        raise ConfigError(
            f"the {schedule} schedule writes the weights outside the optimizer step; not available with DeepSpeed ZeRO",
            field="training.schedule.name",
        )


def import_deepspeed() -> Any:
    """deepspeed, on its CPU accelerator where there is no GPU (it would otherwise look for CUDA)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "DeepSpeed is not installed: pip install deepspeed (with torch installed first)", field="training.deepspeed"
        ) from None
    return deepspeed


class ZeroOptimizer:
    """Looks like a torch optimizer to the loop (zero_grad, step, state_dict, load_state_dict, param_groups);
    the step goes through DeepSpeed's ZeRO engine."""

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, settings: ZeroSettings, micro_batch: int, world: int
    ) -> None:
        deepspeed = import_deepspeed()
        # DeepSpeed replaces each group's parameters by its flat partition: keep the parameters and torch's
        # own description of the groups (hyperparameters, parameter indices) first.
        self.params: list[nn.Parameter] = [p for group in optimizer.param_groups for p in group["params"]]
        self.template = optimizer.state_dict()["param_groups"]
        holder = nn.Module()
        holder.model = module
        known = {id(p) for p in module.parameters()}
        holder.extra = nn.ParameterList([p for p in self.params if id(p) not in known])  # learnable loss weights
        zero: dict[str, Any] = {"stage": settings.stage}
        if settings.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": max(1, micro_batch),
            "train_batch_size": max(1, micro_batch) * world,
            "gradient_accumulation_steps": 1,  # multitune accumulates inside its balanced backward
            "gradient_clipping": 0.0,  # multitune clips before the step
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
        }
        self.base = optimizer
        self.engine, self.zero, _, _ = deepspeed.initialize(model=holder, optimizer=optimizer, config=config)
        self._gradient_hooks(False)

    def _gradient_hooks(self, on: bool) -> None:
        """DeepSpeed reduces a gradient from a hook run when autograd accumulates it into `.grad`. The balanced
        backward accumulates gradients its own way (once per task on the parameters source), so the hooks are
        attached only for the surrogate's backward, where each parameter's gradient arrives once."""
        hooks = getattr(self.zero, "_grad_acc_hooks", None)
        if hooks is None:
            return
        if on:
            self.zero.create_gradient_handling_hooks()
        else:
            for hook in hooks:
                hook.remove()
            hooks.clear()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.zero_grad()
        surrogate = torch.stack([(p * g.to(p.dtype)).sum() for p, g in zip(self.params, grads, strict=True)]).sum()
        self._gradient_hooks(True)
        try:
            self.engine.backward(surrogate)
        finally:
            self._gradient_hooks(False)
        self.engine.step()

    def _link_states(self) -> None:
        """Point each parameter at its piece of every group's flat AdamW state. DeepSpeed links them once,
        after the first group's first step, when the other groups have no state yet: link again."""
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()

    def state_dict(self) -> dict[str, Any]:
        """torch AdamW's state_dict of the whole parameters (a collective: every process calls it)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": saved["params"]}
            for group, saved in zip(self.base.param_groups, self.template, strict=True)
        ]
        partitions = self.zero.single_partition_of_fp32_groups
        flat = next((self.base.state[p] for p in partitions if p in self.base.state), None)
        if flat is None:  # no step yet
            return {"state": {}, "param_groups": groups}
        self._link_states()
        state = {
            index: {
                "step": flat["step"].detach().clone().cpu(),
                **{
                    key: safe_get_full_optimizer_state(p, key).reshape(p.shape).detach().cpu()
                    for key in ("exp_avg", "exp_avg_sq")
                },
            }
            for index, p in enumerate(self.params)
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """A whole state (ours or torch AdamW's): the model's weights, loaded just before, become the master
        copy; each parameter's AdamW state is cut to this process's partition."""
        from deepspeed.utils import safe_set_full_optimizer_state

        self.zero.refresh_fp32_params()
        for group, saved_group in zip(self.base.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        if not saved["state"]:
            return
        step = next(iter(saved["state"].values()))["step"]
        for flat in self.zero.single_partition_of_fp32_groups:
            self.base.state[flat] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone().to(flat.device),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        self._link_states()
        for index, p in enumerate(self.params):
            entry = saved["state"].get(index)
            for key in ("exp_avg", "exp_avg_sq"):
                value = entry[key] if entry is not None else torch.zeros_like(p, dtype=torch.float32)
                safe_set_full_optimizer_state(p, value.to(device=p.device, dtype=torch.float32), key)


class ZeroAccelerator:
    """accelerate's Accelerator as the loop uses it, where accelerate itself is configured for DeepSpeed:
    accelerate would route backward, clipping and autocast through an engine it prepared, and multitune
    prepares its own (ZeroOptimizer)."""

    def __init__(self, accelerator: Any, mixed_precision: str) -> None:
        self.inner = accelerator
        self.mixed_precision = mixed_precision
        self.device = accelerator.device
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index

    def autocast(self) -> AbstractContextManager[Any]:
        if self.mixed_precision == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        loss.backward(**kwargs)

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def prepare(self, *objects: Any) -> Any:
        return objects
