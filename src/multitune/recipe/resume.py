"""Resuming a run: which checkpoint to resume, what a checkpoint holds (TrainingParts), and the history
trimmed back to the checkpoint's step."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from multitune.analysis.guard import NegativeTransferGuard
from multitune.balancing.backward import Balancer
from multitune.catalogue import load_run_config
from multitune.config import Config, dump_config
from multitune.core.files import WEIGHTS_FILE, atomic_write
from multitune.core.processes import Processes
from multitune.core.rng import rng_state, set_rng_state
from multitune.data.samplers import ObservesTraining, TaskSampler
from multitune.data.streams import RowStream
from multitune.data.tokens import Encoded
from multitune.errors import ConfigError
from multitune.training.checkpoint import (
    PREFIX,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from multitune.training.distributed import full_optimizer_state, full_state_dict, shard_optimizer_state_
from multitune.training.loop import TrainState
from multitune.training.schedules import Reptile
from multitune.training.zero import (
    ZeroOptimizer,
)


@dataclass
class TrainingParts:
    """The stateful pieces of a run, saved into and restored from a checkpoint together."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    sampler: TaskSampler
    balancer: Balancer
    streams: dict[str, RowStream[Encoded]]
    guard: NegativeTransferGuard | None = None
    reptile: Reptile | None = None
    sharded: bool = False  # the backbone is sharded across processes: whole tensors are gathered to save
    history_bytes: int | None = None  # the history's size at the checkpoint restored

    def _weights(self) -> torch.nn.Module | dict[str, torch.Tensor]:
        """What to write: the model, or a sharded model's whole tensors (a collective: every process calls).
        Under ZeRO the weights are views into DeepSpeed's flat buffers, so they are written as copies."""
        return full_state_dict(self.model) if self.sharded or self.zero else self.model

    @property
    def zero(self) -> bool:
        return isinstance(self.optimizer, ZeroOptimizer)

    def whole_weights(self, group: Processes) -> torch.nn.Module | dict[str, torch.Tensor] | None:
        """The weights the main process writes (every process takes part in gathering a sharded model;
        the others get them too and write nothing); None on a process with no part in it."""
        return self._weights() if group.main or self.sharded else None

    def save_checkpoint(
        self, run_dir: Path, state: TrainState, keep: int, group: Processes, history_bytes: int | None = None
    ) -> None:
        """A training checkpoint, written by the main process (gathering a sharded backbone or ZeRO's
        partitioned optimizer state takes every process), with the history's size at that point."""
        if group.main or self.sharded or self.zero:
            weights, snapshot = self._weights(), self.snapshot(state)
            if group.main:
                save_checkpoint(run_dir, state.step, weights, {**snapshot, "history_bytes": history_bytes}, keep)

    def snapshot(self, state: TrainState) -> dict[str, Any]:
        weighting, aggregator = self.balancer.weighting, self.balancer.aggregator
        return {
            "loop": asdict(state),
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
            "sampler": self.sampler.state_dict() if isinstance(self.sampler, ObservesTraining) else None,
            "weighting": weighting.state_dict() if isinstance(weighting, torch.nn.Module) else None,
            "aggregator": aggregator.state_dict() if hasattr(aggregator, "state_dict") else None,  # type: ignore[union-attr]
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "reptile": self.reptile.state_dict() if self.reptile is not None else None,
            "task_scale": dict(self.balancer.task_scale),
            "optimizer": full_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }

    def restore(self, checkpoint: Path) -> TrainState:
        saved = load_trainer_state(checkpoint)
        self.history_bytes = saved.get("history_bytes")
        load_weights(self.model, checkpoint / WEIGHTS_FILE, self.sharded or self.zero)
        weighting, aggregator = self.balancer.weighting, self.balancer.aggregator
        if isinstance(weighting, torch.nn.Module) and saved["weighting"] is not None:
            weighting.load_state_dict(saved["weighting"])  # before the optimizer: ZeRO copies every weight
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.sharded:
            shard_optimizer_state_(self.optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        for name, stream in self.streams.items():
            stream.load_state_dict(saved["streams"][name])
        if isinstance(self.sampler, ObservesTraining) and saved["sampler"] is not None:
            self.sampler.load_state_dict(saved["sampler"])
        if aggregator is not None and saved["aggregator"] is not None:
            aggregator.load_state_dict(saved["aggregator"])  # type: ignore[attr-defined]
        if self.guard is not None and saved.get("guard") is not None:
            self.guard.load_state_dict(saved["guard"])
            self.balancer.task_scale = self.guard.scale
        if self.reptile is not None and saved.get("reptile") is not None:
            self.reptile.load_state_dict(saved["reptile"])
        set_rng_state(saved["rng"])
        return TrainState(**saved["loop"])


def find_resume(config: Config) -> tuple[Path | None, Path | None]:
    """(run dir, checkpoint) to continue, or (None, None) for a fresh run. `auto` resumes output_dir/name
    when it has a loadable checkpoint; a path names a run dir. The config must match the saved one."""
    resume = config.run.resume
    if resume is None:
        return None, None
    run_dir = Path(config.run.output_dir) / config.run.name if resume == "auto" else Path(resume)
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        if resume != "auto":
            raise ConfigError("no loadable checkpoint to resume from", file=str(run_dir), field="run.resume")
        print(f"nothing to resume in {run_dir}: starting a new run", file=sys.stderr)
        return None, None
    import yaml

    saved = yaml.safe_load(dump_config(load_run_config(run_dir / "config.yaml")))  # normalised like current
    current = yaml.safe_load(dump_config(config))
    for values in (saved, current):
        values["run"].pop("resume", None)
        values["run"]["output_dir"] = values["run"]["name"] = ""  # a renamed or moved run dir is fine
    difference = first_difference(saved, current)
    if difference is not None:
        raise ConfigError(
            f"the config differs from the run being resumed ({run_dir / 'config.yaml'})", field=difference
        )
    return run_dir, checkpoint


def run_is_complete(run_dir: Path, checkpoint: Path) -> bool:
    """Whether a run ended at `checkpoint`: metrics.json is written once, after the last step's checkpoint, and
    names that step. A newer checkpoint missing or damaged since then makes the run one to continue."""
    try:
        ended = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(ended, int) and checkpoint.name == f"{PREFIX}{ended:08d}"


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two nested dicts, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "<root>")


def synced_size(history: TextIO | None) -> int | None:
    """The history's size once flushed and fsynced: what a checkpoint records, to cut it back to on resume."""
    if history is None:
        return None
    history.flush()
    os.fsync(history.fileno())
    return os.fstat(history.fileno()).st_size


def keep_history_until(path: Path, step: int, size: int | None = None) -> None:
    """Cut the history back to the checkpoint: the resumed run writes what followed it again, and a line
    torn by the crash goes too. A checkpoint records the history's size; one without it (from an older
    version), or a history shorter than that, keeps the lines that parse up to the checkpoint's step."""
    if not path.exists():
        return
    data = path.read_bytes()
    if size is not None and len(data) >= size:
        kept = data[:size]
    else:
        kept = b"".join(line + b"\n" for line in data.split(b"\n") if _history_step(line, step))
    if kept != data:

        def write(tmp: Path) -> None:
            tmp.write_bytes(kept)

        atomic_write(path, write)


def _history_step(line: bytes, step: int) -> bool:
    """Whether a history line is whole and at or before `step`."""
    try:
        entry = json.loads(line)
    except ValueError:  # torn (or not UTF-8): no line multitune finished writing
        return False
    return isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step
