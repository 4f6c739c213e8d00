"""Assembling the multi-task model a model config describes: heads, the sharing architecture (or the
language model), per-task adapters, and the backbone options (compile, gradient checkpointing, weights
from an earlier run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multitune.config import ModelConfig
from multitune.core.files import WEIGHTS_FILE
from multitune.data.tasks import (
    TaskData,
)
from multitune.errors import ConfigError, MultitunError
from multitune.models.architectures import ARCHITECTURES
from multitune.models.backbone import Backbone
from multitune.models.causal_lm import (
    CausalLMMultiTask,
    build_causal_model,
    build_seq2seq_model,
    causal_lm_from_run,
    load_causal_lm,
    load_seq2seq_lm,
    seq2seq_lm_from_run,
)
from multitune.models.heads import HEADS
from multitune.models.multitask import MultiTaskModel
from multitune.models.peft_tasks import TaskAdapters
from multitune.models.vision import load_vision_backbone, vision_from_run


def build_model(model_config: ModelConfig, tasks: dict[str, TaskData], backbone: Backbone) -> MultiTaskModel:
    """The model group alone decides the assembly, so training and a finished run's reload build the same model."""
    heads = {
        name: HEADS.build(
            task.config.type,
            hidden_size=backbone.hidden_size,
            num_labels=len(task.labels or [None]),
            dropout=model_config.dropout if task.config.dropout is None else task.config.dropout,
        )
        for name, task in tasks.items()
        if task.config.type != "generation"  # a generation task trains the causal LM's own head
    }
    architecture = model_config.architecture
    model: MultiTaskModel
    if model_config.kind in ("causal_lm", "seq2seq"):  # the LM is shared, tasks other than generation get heads
        generative = [name for name, task in tasks.items() if task.config.type == "generation"]
        build = build_causal_model if model_config.kind == "causal_lm" else build_seq2seq_model
        model = build(backbone, heads, generative, model_config.pooling)
    else:
        model = ARCHITECTURES.build(
            architecture.name,
            injected={
                "backbone": backbone.model,
                "heads": heads,
                "pooling": model_config.pooling,
                "hidden_size": backbone.hidden_size,
                "model_kind": model_config.kind,
            },
            **architecture.params,
        )
    if model_config.peft is not None:
        model.attach_adapters(TaskAdapters(model.backbone, list(tasks), **model_config.peft.model_dump()))
    return model


LOADERS = {"causal_lm": load_causal_lm, "seq2seq": load_seq2seq_lm, "vision": load_vision_backbone}


FROM_RUN = {"causal_lm": causal_lm_from_run, "seq2seq": seq2seq_lm_from_run, "vision": vision_from_run}


def backbone_modules(model: MultiTaskModel) -> list[torch.nn.Module]:
    """The Hugging Face model(s) of a multi-task model (one per task under soft sharing)."""
    return list(model.backbone.values()) if isinstance(model.backbone, torch.nn.ModuleDict) else [model.backbone]


def compile_backbone(model: MultiTaskModel) -> None:
    """torch.compile, in place, the module(s) each forward runs: the backbone(s), or a causal LM's body
    (its LM head runs separately, only at labelled positions). Dynamic shapes: batches vary in length."""
    modules = [model.body] if isinstance(model, CausalLMMultiTask) else backbone_modules(model)
    for module in modules:
        module.compile(dynamic=True)


def enable_gradient_checkpointing(model: MultiTaskModel) -> None:
    """Activation checkpointing in every Hugging Face backbone of the model (non-reentrant, so the
    per-task backward passes of gradient aggregation can reuse the graph)."""
    for module in backbone_modules(model):
        backbone: Any = module
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"{type(backbone).__name__} does not support gradient checkpointing",
                field="training.gradient_checkpointing",
            )
        options = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):  # the name from transformers 5 on
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def load_backbone_weights(model: MultiTaskModel, run_dir: Path) -> None:
    """Start the backbone from a finished run's backbone (e.g. a multi-task model, for a new task)."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise MultitunError("not a finished multitune run: model.safetensors is missing", file=str(run_dir))
    prefix = "backbone."
    try:
        with safe_open(str(path), framework="pt") as weights:
            state = {key[len(prefix) :]: weights.get_tensor(key) for key in weights.keys() if key.startswith(prefix)}  # noqa: SIM118
    except SafetensorError as error:  # random bytes, an empty or cut-short file
        lines = str(error).strip().splitlines()
        raise ConfigError(
            f"not a readable safetensors file (damaged?): {lines[0] if lines else type(error).__name__}",
            file=str(path),
            field="model.init_from",
        ) from None
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ConfigError(
            f"the backbone of {run_dir} does not fit this model: {first}", field="model.init_from"
        ) from None
