"""Ways to share a backbone between tasks, chosen by `model.architecture.name`.

- hard: one backbone, a head per task (MultiTaskModel itself).
- hybrid: shared lower layers; each task gets its own copy of the top `task_layers` layers, then its head
  (a vision backbone: its top stages or ViT layers, and its final norm).
- soft: a backbone per task, pulled together by an L2 penalty on their differences.
- cross_stitch: a backbone per task whose layer outputs are mixed by learned T×T units after every layer
  (Misra et al., CVPR 2016, "Cross-stitch networks for multi-task learning").
- mmoe: experts over the backbone's token features, mixed by a softmax gate per task (Ma et al., KDD 2018,
  "Modeling task relationships in multi-task learning with multi-gate mixture-of-experts").
- ple: progressive layered extraction, shared and task-specific experts in one or more levels, a gate per
  task (Tang et al., RecSys 2020, "Progressive layered extraction (PLE)").

The expert mixtures act per token, so they serve sequence and token tasks alike; with `residual: true`
(the default) a task's features are the backbone's plus its mixture, so training starts from the
pretrained representation instead of from random experts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from multitune.data.collate import Batch
from multitune.errors import ConfigError
from multitune.models.multitask import MultiTaskModel
from multitune.models.regularization import PullTogether, Regularizer
from multitune.models.vision import PIXELS, final_norm, pooled_tail, probe_pixels, vision_blocks
from multitune.registry import EVERYTHING, Capabilities, Registry

ARCHITECTURES: Registry[MultiTaskModel] = Registry("architecture")
ARCHITECTURE_INJECTED = ("backbone", "heads", "pooling", "hidden_size", "model_kind")
FIELD = "model.architecture"

# Each architecture declares what it supports on registration; the combination rules read these. All but hard
# serve an encoder's heads (the causal and seq2seq LM paths are hard sharing's) and need a whole backbone:
# FSDP2 gathers a unit's weights only when that unit's own forward runs, and hybrid and cross-stitch call the
# layers themselves, soft and cross-stitch keep a backbone per task (mmoe and ple are not tested sharded).
ENCODER_ONLY = Capabilities(model_kinds=frozenset({"encoder"}), sharded=False)
# the expert mixtures act on any features, a vision backbone's pooled ones too (models/vision.py)
POOLED_TOO = Capabilities(model_kinds=frozenset({"encoder", "vision"}), sharded=False)


# --- running a BERT-style encoder piece by piece ------------------------------------------------


def encoder_layers(model: nn.Module, name: str) -> nn.ModuleList:
    """The transformer layers of a BERT-style encoder (`embeddings` + `encoder.layer`)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "embeddings"):
        raise ConfigError(
            f"architecture '{name}' runs the backbone layer by layer and needs a BERT-style encoder "
            f"(embeddings + encoder.layer); {type(model).__name__} is not one",
            field=f"{FIELD}.name",
        )
    return layers


def layer_mask(model: nn.Module, hidden: Tensor, mask: Tensor) -> Any:
    """The attention mask the layers expect (built the way the model's own forward builds it)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)  # type: ignore[arg-type]


def run_layers(layers: Sequence[nn.Module], hidden: Tensor, mask: Any) -> Tensor:
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def embed(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    embeddings: Any = model.embeddings
    return embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))  # type: ignore[no-any-return]


# --- hard and hybrid (on an encoder, or on a vision model's blocks) ----------------------------


@ARCHITECTURES.register("hard", capabilities=EVERYTHING)
def hard(backbone: nn.Module, heads: dict[str, nn.Module], pooling: str) -> MultiTaskModel:
    """Hard sharing: one backbone for every task, one head per task."""
    return MultiTaskModel(backbone, heads, pooling)


def cut_top(blocks: nn.ModuleList, task_layers: int, unit: str) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(the top `task_layers` blocks, the ones below them). Raises ConfigError unless 1 <= task_layers <= all."""
    if not 1 <= task_layers <= len(blocks):
        raise ConfigError(
            f"task_layers must be between 1 and the backbone's {len(blocks)} {unit}, not {task_layers}",
            field=f"{FIELD}.task_layers",
        )
    cut = len(blocks) - task_layers
    return nn.ModuleList(blocks[cut:]), nn.ModuleList(blocks[:cut])


class HybridSharing(MultiTaskModel):
    architecture = "hybrid"
    backbone_features = False

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, task_layers: int) -> None:
        top, backbone.encoder.layer = cut_top(encoder_layers(backbone, "hybrid"), task_layers, "layers")  # type: ignore[union-attr]
        super().__init__(backbone, heads, pooling)
        self.towers = nn.ModuleDict({name: copy.deepcopy(top) for name in heads})

    def task_features(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        return run_layers(self.towers[name], hidden, layer_mask(self.backbone, hidden, mask))  # type: ignore[arg-type]

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        yield from super().pretrained_parameters()
        yield from self.towers.parameters()

    def extra_task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return self.towers[name].parameters()


class VisionHybrid(MultiTaskModel):
    """Hybrid sharing on a vision backbone: shared lower blocks (ResNet or ConvNeXt stages, ViT layers), a
    per-task copy of the top `task_layers` blocks and of the model's final norm, then the task's head."""

    architecture = "hybrid"
    backbone_features = False

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, task_layers: int) -> None:
        owner, attribute = vision_blocks(backbone)
        top, lower = cut_top(getattr(owner, attribute), task_layers, "blocks")
        setattr(owner, attribute, lower)
        norm = final_norm(backbone)
        super().__init__(backbone, heads, pooling)
        self.towers = nn.ModuleDict(
            {name: nn.ModuleDict({"blocks": copy.deepcopy(top), "norm": copy.deepcopy(norm)}) for name in heads}
        )
        self._probe(next(iter(heads)))

    def _probe(self, name: str) -> None:
        """One blank image through the shared blocks and a tower: a model whose blocks take more than the
        features (Swin's take the feature map's size too) is refused here, not at the first training step."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                pixels = probe_pixels(self.backbone)
                hidden = self.backbone(pixel_values=pixels).last_hidden_state
                self.task_features(name, hidden, torch.ones(1, 1, dtype=torch.long))
        except (TypeError, RuntimeError, ValueError) as error:
            raise ConfigError(
                f"hybrid sharing cannot run {type(self.backbone).__name__}'s blocks one by one: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}",
                field="model.architecture.name",
            ) from None
        finally:
            self.train(was)

    def encode(self, batch: Batch) -> Tensor:
        """The shared blocks' raw features: [B, C, h, w] (a CNN) or [B, L, H] (a ViT)."""
        with self.routed(batch):
            return self.backbone(pixel_values=batch.inputs[PIXELS]).last_hidden_state  # type: ignore[no-any-return]

    def task_features(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        tower: Any = self.towers[name]
        for block in tower["blocks"]:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return pooled_tail(hidden, tower["norm"], self.pooling)

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        yield from super().pretrained_parameters()
        yield from self.towers.parameters()

    def extra_task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return self.towers[name].parameters()


@ARCHITECTURES.register("hybrid", capabilities=POOLED_TOO)
def hybrid(
    backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, task_layers: int = 2, model_kind: str = "encoder"
) -> MultiTaskModel:
    """Hybrid: shared lower layers, a per-task copy of the top `task_layers` layers, then heads."""
    if model_kind == "vision":
        return VisionHybrid(backbone, heads, pooling, task_layers)
    return HybridSharing(backbone, heads, pooling, task_layers)


# --- soft sharing and cross-stitch --------------------------------------------------------------


class SoftSharing(MultiTaskModel):
    """A backbone per task. No parameter is shared, so gradient aggregation can only use the
    representation source (each task's gradient lives on its own rows)."""

    architecture = "soft"
    backbone_features = False

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, penalty: float) -> None:
        names = list(heads)
        copies = {names[0]: backbone, **{name: copy.deepcopy(backbone) for name in names[1:]}}
        super().__init__(nn.ModuleDict(copies), heads, pooling)
        self.penalty = penalty

    def encode(self, batch: Batch) -> Tensor:
        parts = []
        for name, part in batch.tasks.items():
            inputs = {k: v[part.rows] for k, v in batch.inputs.items()}
            parts.append(self.hidden_states(self.backbone[name], inputs))  # type: ignore[index]
        return torch.cat(parts)  # rows of a batch are grouped by task, in the order of batch.tasks

    def regularizers(self) -> list[Regularizer]:
        if not self.penalty or len(self.backbone) < 2:  # type: ignore[arg-type]
            return []
        columns = [list(b.parameters()) for b in self.backbone.values()]  # type: ignore[operator]
        return [PullTogether(columns, self.penalty)]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
        yield from self.backbone[name].parameters()  # type: ignore[index]


# a backbone per task: no parameter is shared, so there are no per-task gradients of shared weights; per-task
# adapters would only add a second set of task weights to weights that are already the task's own
@ARCHITECTURES.register(
    "soft",
    capabilities=Capabilities(
        model_kinds=frozenset({"encoder", "vision"}), shares_parameters=False, takes_adapters=False, sharded=False
    ),
)
def soft(backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, penalty: float = 1e-4) -> MultiTaskModel:
    """Soft sharing: a backbone per task, pulled together by `penalty`·Σ‖θ_t − θ̄‖²."""
    return SoftSharing(backbone, heads, pooling, penalty)


class CrossStitch(SoftSharing):
    """Every row runs through every task's backbone; after each layer, task t's activations become
    Σ_s α[l, t, s]·h_s. α starts near the identity (`keep` on the diagonal) and is learned (shared)."""

    architecture = "cross_stitch"

    def __init__(
        self, backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, penalty: float, keep: float
    ) -> None:
        super().__init__(backbone, heads, pooling, penalty)
        self.names = list(heads)
        depth = len(encoder_layers(backbone, "cross_stitch"))
        t = len(self.names)
        init = torch.full((t, t), (1.0 - keep) / (t - 1)) if t > 1 else torch.zeros(1, 1)
        init.fill_diagonal_(keep if t > 1 else 1.0)
        self.stitch = nn.Parameter(init.repeat(depth, 1, 1))  # [layers, T, T]

    def encode(self, batch: Batch) -> Tensor:
        backbones = [self.backbone[name] for name in self.names]  # type: ignore[index]
        columns = [embed(b, batch.inputs) for b in backbones]
        mask = layer_mask(backbones[0], columns[0], batch.inputs["attention_mask"])
        for depth in range(self.stitch.shape[0]):
            columns = [
                run_layers([encoder_layers(b, "cross_stitch")[depth]], h, mask)
                for b, h in zip(backbones, columns, strict=True)
            ]
            mixed = torch.einsum("ts,sblh->tblh", self.stitch[depth].to(columns[0].dtype), torch.stack(columns))
            columns = list(mixed.unbind(0))
        return torch.cat([columns[self.names.index(name)][part.rows] for name, part in batch.tasks.items()])

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield self.stitch


# a backbone per task too (so no adapters), but the learned stitch units mix every task's activations after
# each layer: every task's loss depends on them, they are its shared parameters (shared_parameters), and their
# per-task gradients are what the parameters source, task affinity and the guard use
@ARCHITECTURES.register(
    "cross_stitch",
    capabilities=Capabilities(
        model_kinds=frozenset({"encoder"}), shares_parameters=True, takes_adapters=False, sharded=False
    ),
)
def cross_stitch(
    backbone: nn.Module, heads: dict[str, nn.Module], pooling: str, penalty: float = 0.0, keep: float = 0.9
) -> MultiTaskModel:
    """Cross-stitch (Misra et al. 2016): per-task backbones mixed by learned units after each layer."""
    return CrossStitch(backbone, heads, pooling, penalty, keep)


# --- expert mixtures ----------------------------------------------------------------------------


def expert(hidden_size: int, expert_size: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(hidden_size, expert_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(expert_size, hidden_size)
    )


def mix(gate_logits: Tensor, outputs: Sequence[Tensor]) -> Tensor:
    """Σ_e softmax(gate)_e · output_e, per token: gate [b, L, E], outputs E × [b, L, H] -> [b, L, H]."""
    weights = gate_logits.float().softmax(-1).to(outputs[0].dtype)
    return torch.einsum("ble,eblh->blh", weights, torch.stack(list(outputs)))


class MixtureOfExperts(MultiTaskModel):
    architecture = "mmoe"
    backbone_features = False

    def __init__(
        self,
        backbone: nn.Module,
        heads: dict[str, nn.Module],
        pooling: str,
        hidden_size: int,
        experts: int,
        expert_size: int,
        dropout: float,
        residual: bool,
    ) -> None:
        super().__init__(backbone, heads, pooling)
        self.residual = residual
        self.experts = nn.ModuleList(expert(hidden_size, expert_size, dropout) for _ in range(experts))
        self.gates = nn.ModuleDict({name: nn.Linear(hidden_size, experts) for name in heads})

    def task_features(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        mixed = mix(self.gates[name](hidden), [e(hidden) for e in self.experts])
        return hidden + mixed if self.residual else mixed

    def extra_shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.experts.parameters()

    def extra_task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return self.gates[name].parameters()


def _positive(value: int, key: str) -> int:
    if value < 1:
        raise ConfigError(f"must be at least 1, not {value}", field=f"{FIELD}.{key}")
    return value


@ARCHITECTURES.register("mmoe", capabilities=POOLED_TOO)
def mmoe(
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    pooling: str,
    hidden_size: int,
    experts: int = 4,
    expert_size: int | None = None,
    dropout: float = 0.1,
    residual: bool = True,
) -> MultiTaskModel:
    """MMoE (Ma et al. 2018): shared experts on token features, a softmax gate per task."""
    size = _positive(expert_size or hidden_size, "expert_size")
    return MixtureOfExperts(
        backbone, heads, pooling, hidden_size, _positive(experts, "experts"), size, dropout, residual
    )


class ProgressiveLayeredExtraction(MultiTaskModel):
    """Level l: task t's gate mixes its own experts and the shared experts (on its own input); below the
    top level a shared gate mixes every expert into the next level's shared input."""

    architecture = "ple"
    backbone_features = False

    def __init__(
        self,
        backbone: nn.Module,
        heads: dict[str, nn.Module],
        pooling: str,
        hidden_size: int,
        shared_experts: int,
        task_experts: int,
        levels: int,
        expert_size: int,
        dropout: float,
        residual: bool,
    ) -> None:
        super().__init__(backbone, heads, pooling)
        self.names, self.residual = list(heads), residual
        t, h = len(heads), hidden_size

        def experts(n: int) -> nn.ModuleList:
            return nn.ModuleList(expert(h, expert_size, dropout) for _ in range(n))

        self.levels = nn.ModuleList()
        for level in range(levels):
            top = level == levels - 1
            parts = nn.ModuleDict(
                {
                    "shared": experts(shared_experts),
                    "task": nn.ModuleDict({name: experts(task_experts) for name in heads}),
                    "gates": nn.ModuleDict({name: nn.Linear(h, task_experts + shared_experts) for name in heads}),
                }
            )
            if not top:
                parts["shared_gate"] = nn.Linear(h, t * task_experts + shared_experts)
            self.levels.append(parts)

    def task_features(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        inputs = dict.fromkeys(self.names, hidden)
        shared = hidden
        for i, level in enumerate(self.levels):
            top = i == len(self.levels) - 1
            wanted = [name] if top else self.names
            shared_out = [e(shared) for e in level["shared"]]  # type: ignore[index]
            task_out = {t: [e(inputs[t]) for e in level["task"][t]] for t in wanted}  # type: ignore[index]
            new = {t: mix(level["gates"][t](inputs[t]), task_out[t] + shared_out) for t in wanted}  # type: ignore[index]
            if not top:
                every = [o for t in self.names for o in task_out[t]] + shared_out
                shared = mix(level["shared_gate"](shared), every)  # type: ignore[index]
            inputs = new
        return hidden + inputs[name] if self.residual else inputs[name]

    def extra_shared_parameters(self) -> Iterator[nn.Parameter]:
        """Shared experts and gates, and below the top level every task's experts too (they feed the shared
        gate, so every task depends on them)."""
        for i, level in enumerate(self.levels):
            yield from level["shared"].parameters()  # type: ignore[index]
            if "shared_gate" in level:  # type: ignore[operator]
                yield from level["shared_gate"].parameters()  # type: ignore[index]
            if i < len(self.levels) - 1:
                yield from level["task"].parameters()  # type: ignore[index]

    def extra_task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.levels[-1]["task"][name].parameters()  # type: ignore[index]
        for level in self.levels:
            yield from level["gates"][name].parameters()  # type: ignore[index]


@ARCHITECTURES.register("ple", capabilities=POOLED_TOO)
def ple(
    backbone: nn.Module,
    heads: dict[str, nn.Module],
    pooling: str,
    hidden_size: int,
    shared_experts: int = 2,
    task_experts: int = 1,
    levels: int = 1,
    expert_size: int | None = None,
    dropout: float = 0.1,
    residual: bool = True,
) -> MultiTaskModel:
    """PLE (Tang et al. 2020): shared and per-task experts in `levels` levels, a gate per task."""
    return ProgressiveLayeredExtraction(
        backbone,
        heads,
        pooling,
        hidden_size,
        _positive(shared_experts, "shared_experts"),
        _positive(task_experts, "task_experts"),
        _positive(levels, "levels"),
        _positive(expert_size or hidden_size, "expert_size"),
        dropout,
        residual,
    )
