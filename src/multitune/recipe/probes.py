"""Task-relation probes: fixed batches per task, and the gradient cosine and lookahead affinity measured on
them during training (analysis/affinity.py holds the measures)."""

from __future__ import annotations

import random
from typing import Any

import torch

from multitune.analysis.affinity import NO_SELF_TRANSFER, cosine_matrix, lookahead_affinity
from multitune.balancing.gradients import gramian
from multitune.config import TrainingConfig
from multitune.data.collate import Batch, collate
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.prepare import Prepared


def probe_batches(prepared: Prepared, training: TrainingConfig, seed: int, split: str = "train") -> dict[str, Batch]:
    """A fixed, seeded batch (training.batch_size rows) of one split's rows per task, on which task relations
    are measured (a streamed train split: of its sample, Prepared.training_sample)."""
    out = {}
    for name in prepared.tasks:
        rows = prepared.training_sample(name) if split == "train" else prepared.encoded[name][split]
        picks = random.Random(f"{seed}:{name}:probe:{split}").sample(
            range(len(rows)), min(len(rows), training.batch_size)
        )
        out[name] = collate({name: [rows[i] for i in picks]}, prepared.pad_id)
    return out


def measure_relations(
    model: MultiTaskModel,
    probes: dict[str, Batch],
    held_out: dict[str, Batch],
    device: torch.device,
    lookahead_lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient cosines [T, T] of the task gradients on the training probe batches, and lookahead affinity
    [T, T]: a step along each task's training gradient, judged by every task's loss on its held-out probe
    batch (validation rows), so that Z_ii says whether what task i learns generalizes even to itself.
    Dropout off, weights untouched."""
    was_training = model.training
    model.eval()
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    grads = []
    for name, batch in probes.items():
        batch = batch.to(device)
        loss = model.head_losses(model.encode(batch), batch)[name]
        pieces = torch.autograd.grad(loss, shared, allow_unused=True)
        grads.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(pieces, shared, strict=True)]
            )
        )
    matrix = torch.stack(grads)  # [T, P]
    judged = {name: batch.to(device) for name, batch in held_out.items()}

    def losses() -> torch.Tensor:
        return torch.stack([model.head_losses(model.encode(b), b)[n] for n, b in judged.items()]).float()

    cosine = cosine_matrix(gramian(matrix))
    lookahead = lookahead_affinity(shared, matrix, losses, lookahead_lr)
    model.train(was_training)
    return cosine, lookahead


def format_relations(relations: dict[str, Any]) -> str:
    names = relations["tasks"]
    width = max(len(n) for n in names) + 2
    lines = [f"task relations over {relations['samples']} samples (rows: from, columns: to)"]
    for title, key, fmt in (
        ("gradient cosine", "gradient_cosine", "{:+.3f}"),
        ("lookahead affinity", "lookahead_affinity", "{:+.2e}"),
    ):
        lines.append(title)
        lines.append(" " * width + "".join(n[:10].rjust(11) for n in names))
        for name, row in zip(names, relations[key], strict=True):
            lines.append(name.ljust(width) + "".join(fmt.format(v).rjust(11) for v in row))
    lines.append("suggested groups: " + "; ".join(" + ".join(g) for g in relations["groups"]))
    if relations.get("no_self_transfer"):
        lines.append(f"flagged, as {NO_SELF_TRANSFER}: " + ", ".join(relations["no_self_transfer"]))
    return "\n".join(lines)
