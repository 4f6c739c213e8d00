"""The training session the YAML recipe and `multitune.fit` share: history, the validation rule, the best
weights, the final metrics and what the run directory records."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from multitune.balancing.backward import Balancer
from multitune.config.schema import TrainingConfig
from multitune.core.files import WEIGHTS_FILE, write_json
from multitune.core.history import HistoryLines, read_history
from multitune.errors import ConfigError
from multitune.evaluation.evaluate import average_main_score
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.resume import synced_size
from multitune.training.checkpoint import load_weights, save_weights
from multitune.training.loop import LoopHooks, LoopSettings, StopSignal, TrainState, Validation

log = logging.getLogger(__name__)


def tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "needs the tensorboard package (pip install tensorboard)", field="training.tensorboard"
        ) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def write_scalars(writer: Any, entry: dict[str, Any]) -> None:
    """One history entry as TensorBoard scalars: loss/TASK, weight/TASK, probability/TASK, validation/TASK/METRIC."""
    step = entry["step"]
    for key, prefix in (("losses", "loss"), ("weights", "weight"), ("probabilities", "probability")):
        for name, value in (entry.get(key) or {}).items():
            writer.add_scalar(f"{prefix}/{name}", value, step)
    for name, metrics in (entry.get("validation") or {}).items():
        for metric, value in metrics.items():
            writer.add_scalar(f"validation/{name}/{metric}", value, step)
    if "average_main_score" in entry:
        writer.add_scalar("validation/average_main_score", entry["average_main_score"], step)
    if "lr" in entry:
        writer.add_scalar("lr", entry["lr"], step)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory of this process (bytes), or on the CPU its own peak resident set size: Linux's
    VmHWM, the high-water mark of this program's address space. getrusage's ru_maxrss is not used there: a
    process started by another (compare's baselines, after merges grew the parent) inherits the parent's
    size at the fork in it, even across exec. Elsewhere ru_maxrss (KiB, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    import resource
    import sys

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def loop_settings(training: TrainingConfig, seed: int, pad_id: int) -> LoopSettings:
    """The training loop's plain settings from the config's training group (the YAML recipe and fit)."""
    return LoopSettings(
        steps=training.steps,
        batch_size=training.batch_size,
        seed=seed,
        pad_id=pad_id,
        mixed_batches=training.mixed_batches,
        max_grad_norm=training.max_grad_norm,
        eval_every=training.eval_every,
        log_every=training.log_every,
        checkpoint_every=training.checkpoint_every,
        max_nonfinite_steps=training.max_nonfinite_steps,
        progress=training.progress,
        early_stopping=training.early_stopping,
        gradient_accumulation=training.gradient_accumulation,
    )


@dataclass
class Session:
    """What one training session records, the same for the YAML recipe and `multitune.fit`.

    - history: every loop entry, appended to RUN_DIR/history.jsonl (and TensorBoard) by the main process,
      and kept in `entries` when asked (fit returns them);
    - the validation rule: the average main score picks the best weights; each task's score is signed so
      that higher is better (early stopping and the guard read those);
    - the best weights: RUN_DIR/model.safetensors, or a copy in memory without a run directory;
    - the final metrics (metrics.json) and the task manifest (tasks.json).
    """

    run_dir: Path | None
    main: bool = True
    keep_entries: bool = False
    sink: Callable[[dict[str, Any]], None] | None = None  # where else each entry goes (two-stage: tagged)
    entries: list[dict[str, Any]] = field(default_factory=list)
    _stream: TextIO | None = None
    _lines: HistoryLines = field(default_factory=HistoryLines)  # weights/probabilities only when they change
    _scalars: Any = None
    _best: dict[str, Tensor] | None = None

    @property
    def weights_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / WEIGHTS_FILE

    def open(self, tensorboard: bool = False) -> None:
        """Start appending to the run's history (the main process; nothing without a run directory)."""
        if self.run_dir is not None and self.main:
            path = self.run_dir / "history.jsonl"
            self._lines.seen(read_history(path))  # a resumed run continues the file's carried values
            self._stream = path.open("a", encoding="utf-8")
            self._scalars = tensorboard_writer(self.run_dir) if tensorboard else None

    def close(self) -> None:
        for handle in (self._stream, self._scalars):
            if handle is not None:
                handle.close()
        self._stream = self._scalars = None

    def history_bytes(self) -> int | None:
        """The history's size so far, written through to the disk (a checkpoint records it)."""
        return synced_size(self._stream)

    def record(self, entry: dict[str, Any]) -> None:
        if self.keep_entries:
            self.entries.append(entry)
        if self.sink is not None:
            self.sink(entry)
        if self._stream is not None:
            self._stream.write(json.dumps(self._lines.line(entry)) + "\n")
            self._stream.flush()
        if self._scalars is not None:
            write_scalars(self._scalars, entry)

    def validation(self, step: int, results: dict[str, dict[str, Any]]) -> Validation:
        """Record one validation's per-task results (evaluation/evaluate.py's entries) and rank it."""
        score = average_main_score(results)
        self.record(
            {"step": step, "validation": {n: r["metrics"] for n, r in results.items()}, "average_main_score": score}
        )
        log.info("step %d: validation average main score %.4f", step, score)
        signed = {n: r["main_score"] if r["higher_is_better"] else -r["main_score"] for n, r in results.items()}
        return Validation(score, {n: r["main_score"] for n, r in results.items()}, signed)

    def keep_best(self, weights: Callable[[], nn.Module | dict[str, Tensor] | None]) -> None:
        """The loop found new best weights: write them (main process), or copy them without a run directory.
        `weights` gives them whole (gathering a sharded model takes every process: each calls this)."""
        whole = weights()
        if whole is None:
            return
        state = whole.state_dict() if isinstance(whole, nn.Module) else whole
        if self.weights_path is None:
            self._best = {key: value.detach().clone() for key, value in state.items()}
        elif self.main:
            save_weights(whole, self.weights_path)

    def restore_best(self, model: nn.Module, sharded: bool = False) -> None:
        """Put the best weights back into `model` (each process, sharded: its own shard)."""
        if self.weights_path is not None:
            load_weights(model, self.weights_path, sharded)
        elif self._best is not None:
            model.load_state_dict(self._best)

    def metrics(
        self,
        results: dict[str, dict[str, Any]],
        state: TrainState,
        balancer: Balancer,
        model: MultiTaskModel,
        device: torch.device,
        stages: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """metrics.json: the test results and how the session went."""
        best = state.best_score
        return {
            "tasks": results,
            "average_main_score": average_main_score(results),
            **(stages or {}),
            "train_seconds": round(state.seconds, 2),
            "steps": state.step,
            "best_step": state.best_step,
            "validation_average_main_score": round(best, 6) if math.isfinite(best) else None,
            "task_steps": state.task_steps,
            "task_rows": state.task_rows,
            "task_tokens": state.task_tokens,
            "skipped_steps": state.skipped_steps,
            "stopped_early": state.stopped_early,
            "stopped_tasks": state.stopped_tasks,
            "task_scale": dict(balancer.task_scale),
            "peak_memory_bytes": peak_memory_bytes(device),
            "parameters": {
                "shared": sum(p.numel() for p in model.shared_parameters()),
                "heads": {name: sum(p.numel() for p in model.task_parameters(name)) for name in results},
            },
        }

    def hooks(
        self,
        score: Callable[[str], dict[str, dict[str, Any]]],
        weights: Callable[[], nn.Module | dict[str, Tensor] | None],
        checkpoint: Callable[[TrainState], object] = lambda state: None,
        stop: StopSignal | None = None,
        before_validation: Callable[[int], None] | None = None,
        after_validation: Callable[[int, Validation], None] | None = None,
    ) -> LoopHooks:
        """The loop's hooks for this session. `score(split)` gives per-task results; `weights()` the whole
        weights to keep when they are the best so far; the optional callbacks run around each validation
        (task-relation probes before it, the negative-transfer guard after it)."""

        def validate(step: int) -> Validation:
            if before_validation is not None:
                before_validation(step)
            validation = self.validation(step, score("validation"))
            if after_validation is not None:
                after_validation(step, validation)
            return validation

        return LoopHooks(validate, lambda step: self.keep_best(weights), checkpoint, self.record, stop)

    def write(self, name: str, value: Any) -> None:
        """RUN_DIR/name as JSON (metrics.json, tasks.json...), by the main process; nothing without a run."""
        if self.run_dir is not None and self.main:
            write_json(self.run_dir / name, value)
