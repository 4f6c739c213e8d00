"""Low-rank refinement: the two-stage schedule's per-task copy (MT-DNN's refinement, Liu et al. 2019,
"Multi-Task Deep Neural Networks for Natural Language Understanding") stored as a LoRA adapter (Hu et al.
2022, "LoRA: Low-Rank Adaptation of Large Language Models") and the task's head, instead of a whole model.

While a task is refined, peft's LoRA layers wrap every linear projection of the shared backbone
("all-linear": the output layer of an LM excluded) and only they and the task's own head train; every
shared weight stays frozen. The stored refinement is RUN_DIR/finetuned/TASK/refinement.safetensors (the
adapter's A and B matrices and the head, named as in the multi-task model's state dict) beside
refinement.json (method, rank, alpha, the projections adapted). Loading merges the adapter into the shared
weights with peft (W ← W + (alpha/r)·B·A) and loads the head, which gives a plain model of the same
architecture: evaluate, predict, serve and export need nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multitune.errors import ConfigError, MultitunError

REFINEMENT_FILE = "refinement.safetensors"
REFINEMENT_CONFIG = "refinement.json"
ADAPTER = "refine"  # the adapter's name inside peft's layers while it trains or loads
TARGETS = "all-linear"


def lora_targets(model: nn.Module, top_blocks: int | None = None) -> Any:
    """The projections a refinement adapts: peft's "all-linear" on a transformers model with linear layers (its
    LM head left out), else every linear and convolution layer of the backbone, by name (any backbone of `fit`,
    a ResNet). With `top_blocks` N: by name, the linear layers (GPT-2's Conv1D too) of the last N blocks of
    each of the backbone's stacks of blocks (models/merging.py's `layer_blocks`: a transformer's layers; an
    encoder-decoder's last N encoder and last N decoder layers), so the frozen blocks below run without a
    graph and the backward pass stops at the lowest adapted block; layers outside the blocks (a pooler) are
    not adapted. Raises ConfigError where N exceeds a stack or there are no blocks, MultitunError where there
    is nothing to adapt."""
    from transformers import PreTrainedModel

    backbone = model.get_submodule("backbone")
    if top_blocks is not None:
        return _top_block_targets(backbone, top_blocks)
    if isinstance(backbone, PreTrainedModel) and any(isinstance(m, nn.Linear) for m in backbone.modules()):
        return TARGETS
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # a CNN (ResNet, ConvNeXt's stem) has convolutions
    names = sorted(name for name, module in backbone.named_modules() if name and isinstance(module, layers))
    if not names:
        raise MultitunError("the backbone has no linear or convolution layer to refine with LoRA", field="refine")
    return names


def _top_block_targets(backbone: nn.Module, top_blocks: int) -> list[str]:
    from multitune.models.merging import layer_blocks, linear_layers

    field = "training.schedule.refine_layers"
    try:
        blocks = layer_blocks(backbone)
    except ValueError as error:
        raise ConfigError(f"refine_layers: {error}", field=field) from None
    stacks: dict[str, list[str]] = {}
    for block in blocks:  # "encoder.layer.3" -> stack "encoder.layer"
        stacks.setdefault(block.rpartition(".")[0], []).append(block)
    short = {stack: len(found) for stack, found in stacks.items() if len(found) < top_blocks}
    if short:
        sizes = ", ".join(f"{stack or 'the backbone'} has {size}" for stack, size in short.items())
        raise ConfigError(f"refine_layers is {top_blocks}, more blocks than a stack holds: {sizes}", field=field)
    chosen = tuple(f"{block}." for found in stacks.values() for block in found[-top_blocks:])
    return sorted(name for name in linear_layers(backbone) if name.startswith(chosen))


def add_lora(model: nn.Module, task: str, r: int, alpha: int, target_modules: Any = TARGETS) -> Any:
    """Wrap `model.backbone`'s linear projections with a fresh LoRA adapter (rank `r`, scale alpha/r, B = 0 so
    the model is unchanged) and leave trainable only the adapter and `model.heads[task]`. Returns peft's
    LoraModel: pass it to `unload` when done. Raises MultitunError where peft finds nothing to adapt."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules)
    try:
        lora = LoraModel(model.backbone, config, ADAPTER)  # type: ignore[arg-type]
    except ValueError as error:
        raise MultitunError(f"cannot add the LoRA refinement: {error}", field="training.schedule.refine") from None
    head = f"heads.{task}."
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name or name.startswith(head)
    return lora


def refinement_state(model: nn.Module, task: str) -> dict[str, torch.Tensor]:
    """What a refinement stores: the adapter's matrices and the task's head ([out, in] tensors, as trained)."""
    head = f"heads.{task}."
    return {
        name: value.detach().contiguous()
        for name, value in model.state_dict().items()
        if "lora_" in name or name.startswith(head)
    }


def save_refinement(model: nn.Module, lora: Any, task: str, folder: Path) -> None:
    """Write the task's refinement into `folder` (see the module's docstring for the files)."""
    from safetensors.torch import save_file

    config = lora.peft_config[ADAPTER]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(refinement_state(model, task), str(folder / REFINEMENT_FILE))
    settings = {
        "method": "lora",
        "r": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "task": task,
    }
    (folder / REFINEMENT_CONFIG).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def unload(lora: Any, merge: bool) -> None:
    """Take the adapter's layers out of the backbone, merging the adapter into the weights first (`merge`) or
    dropping it; the backbone object stays the one the model holds."""
    if merge:
        lora.merge_and_unload()
    else:
        lora.unload()


def merge_refinement(model: nn.Module, folder: Path) -> None:
    """Merge the refinement stored in `folder` into `model`, which holds the shared weights; raises
    MultitunError naming the file when it is damaged or does not fit the model."""
    from safetensors.torch import load_file

    config_path, weights_path = folder / REFINEMENT_CONFIG, folder / REFINEMENT_FILE
    try:
        settings = json.loads(config_path.read_text(encoding="utf-8"))
        r, alpha, targets = int(settings["r"]), int(settings["alpha"]), list(settings["target_modules"])
        task = str(settings["task"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = f"not a refinement settings file as multitune writes: {error}"
        raise MultitunError(message, file=str(config_path)) from None
    lora = add_lora(model, task, r, alpha, targets)
    try:
        state = load_file(str(weights_path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (OSError, RuntimeError, ValueError) as error:
        unload(lora, merge=False)
        first = str(error).strip().splitlines()
        message = f"the refinement cannot be loaded: {first[-1] if first else ''}"
        raise MultitunError(message, file=str(weights_path)) from None
    wanted = set(refinement_state(model, task))
    if unexpected or wanted & set(missing):
        unload(lora, merge=False)
        names = sorted(unexpected) or sorted(wanted & set(missing))
        raise MultitunError(f"the refinement does not fit the model (e.g. {names[0]})", file=str(weights_path))
    unload(lora, merge=True)
