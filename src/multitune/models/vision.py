"""A pretrained vision backbone from transformers (AutoModel: ResNet, ConvNeXt, ViT, DeiT, Swin, DINOv2...,
and timm checkpoints through transformers' TimmWrapper) with its image processor, giving each image one
pooled feature vector for the task heads.

The features of a row are [1, H]: a convolutional model's own pooled output (ResNet's global average pool,
ConvNeXt's pool and layer norm), or for a transformer the first token (`model.pooling: cls`, as
ViTForImageClassification reads it) or the mean over its tokens (`mean`). Every architecture that acts on
pooled features (hard and soft sharing, MMoE, PLE) then works as on text; LoRA adapts a ViT's attention
projections (`query`, `value`) as it does BERT's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from multitune.errors import ConfigError
from multitune.models.backbone import Backbone, auto_model, load_kwargs, load_with_fallback

PIXELS = "pixel_values"


def image_features(output: Any, pooling: str) -> Tensor:
    """A vision model's output -> one feature vector per image, [B, 1, H].

    `last_hidden_state` [B, C, h, w] (a CNN): its `pooler_output` ([B, C] or [B, C, 1, 1]) when the model
    has one, else the mean over positions; [B, L, H] (a transformer): token 0 for `cls`, else the token mean."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    pooled = getattr(output, "pooler_output", None)
    if hidden.ndim == 4:
        features = pooled.flatten(1) if pooled is not None else hidden.mean((2, 3))
    elif hidden.ndim == 3:
        features = hidden[:, 0] if pooling == "cls" else hidden.mean(1)
    else:  # [B, H]: already one vector per image (a timm model's pooled output)
        features = hidden
    return features.unsqueeze(1)


def _probe(model: nn.Module, processor: Any) -> Any:
    """The model's output on one blank image of the processor's size (no gradient), to learn its shapes."""
    from PIL import Image

    pixels = processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")[PIXELS]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model(pixel_values=pixels)
    model.train(was_training)
    return output


def _fitted(model: nn.Module, processor: Any, source: str) -> Backbone:
    """The backbone with its feature size; a transformer's pooler (a dense layer on token 0 that
    `image_features` does not read, and an untrained one in most checkpoints) is removed."""
    output = _probe(model, processor)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    pooler = getattr(model, "pooler", None)
    if hidden.ndim == 3 and isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        model.pooler = None  # type: ignore[assignment]
    size = int(image_features(output, "mean").shape[-1])
    return Backbone(model, processor, source, feature_size=size)


def _from(source: str, revision: str | None, trust_remote_code: bool, random_init: bool) -> Backbone:
    from transformers import AutoImageProcessor

    kwargs = load_kwargs(source, revision, trust_remote_code)
    processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    return _fitted(auto_model(source, kwargs, random_init), processor, source)


def load_vision_backbone(
    name: str, revision: str | None = None, trust_remote_code: bool = False, random_init: bool = False
) -> Backbone:
    """A vision model and its image processor, by hub id or folder (a local copy first, as for text).
    Raises ConfigError naming every source tried when none loads."""
    return load_with_fallback(
        name, revision, lambda source, rev: _from(source, rev, trust_remote_code, random_init), None, "backbone", None
    )


def vision_from_run(folder: Path) -> Backbone:
    """A saved run's vision backbone architecture and image processor (weights come from the run)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    return _fitted(model, processor, str(folder))


# --- a vision model cut into shared lower blocks and per-task top blocks (hybrid sharing) -------------------


def vision_blocks(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of a vision model's sequence of blocks, each taking and returning the features:
    a CNN's stages (ResNet, ConvNeXt: `encoder.stages`) or a ViT's transformer layers (`layers` or
    `encoder.layer`). Raises ConfigError for a model of another layout."""
    encoder = getattr(model, "encoder", None)
    for owner, attribute in ((encoder, "stages"), (model, "layers"), (encoder, "layer")):
        if owner is not None and isinstance(getattr(owner, attribute, None), nn.ModuleList):
            return owner, attribute
    raise ConfigError(
        f"hybrid sharing cuts a vision model into blocks (ResNet or ConvNeXt stages, ViT layers); "
        f"{type(model).__name__} exposes none",
        field="model.architecture.name",
    )


def pooled_tail(hidden: Tensor, norm: nn.Module, pooling: str) -> Tensor:
    """The features after a vision model's last block as one vector per image, [b, 1, H], the way the model
    ends: a CNN's [b, C, h, w] averaged over positions, then its final norm if it has one (ConvNeXt); a ViT's
    [b, L, H] through its final layer norm, then token 0 (`cls`) or the token mean."""
    if hidden.ndim == 4:
        return norm(hidden.mean((2, 3))).unsqueeze(1)  # type: ignore[no-any-return]
    hidden = norm(hidden)
    return (hidden[:, 0] if pooling == "cls" else hidden.mean(1)).unsqueeze(1)


def final_norm(model: nn.Module) -> nn.Module:
    """The model's norm after its last block (ViT's and ConvNeXt's `layernorm`), replaced in the model by an
    identity so that its output is the raw features of its (shared) blocks; an identity for a model without."""
    norm = getattr(model, "layernorm", None)
    if isinstance(norm, nn.Module):
        model.layernorm = nn.Identity()  # type: ignore[assignment]
        return norm
    return nn.Identity()


def probe_pixels(model: nn.Module) -> Tensor:
    """A blank batch of one image of the size the model's config names (ViT's image_size; else 64 pixels)."""
    config: Any = getattr(model, "config", None)
    size = int(getattr(config, "image_size", 64) or 64)
    return torch.zeros(1, int(getattr(config, "num_channels", 3) or 3), size, size)
