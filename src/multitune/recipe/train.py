"""The YAML recipe, read top to bottom: config -> data -> model -> launch -> the training session ->
metrics.json and the report. A bad input fails before the run directory exists; an existing one is never
touched. `multitune resume` continues a run from its newest checkpoint."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitune.analysis.affinity import AffinityTracker
from multitune.analysis.guard import NegativeTransferGuard
from multitune.balancing.backward import Balancer
from multitune.catalogue import load_run_config
from multitune.config import Config, dump_config
from multitune.config.schema import TrainingConfig
from multitune.core.files import write_json, write_text
from multitune.core.processes import Processes, from_accelerator
from multitune.data.samplers import TaskSampler, token_mix
from multitune.data.streams import RowStream
from multitune.data.tokens import Encoded
from multitune.errors import MultitunError
from multitune.evaluation.evaluate import PRINTED_TASKS, average_main_score, format_table
from multitune.evaluation.report import write_report
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.components import (
    build_balancer,
    build_collate,
    build_guard,
    build_optimizer,
    build_regularizers,
    build_sampler,
    require_shared_parameters,
    still_loss_weights,
)
from multitune.recipe.launch import build_accelerator, check_distributed
from multitune.recipe.prepare import Prepared, prepare
from multitune.recipe.probes import format_relations, measure_relations, probe_batches
from multitune.recipe.resume import TrainingParts, find_resume, keep_history_until, run_is_complete
from multitune.recipe.session import Session, loop_settings
from multitune.recipe.two_stage import finetune_per_task, record_finetune, refinement_targets
from multitune.runs.layout import (
    create_run_dir,
    task_manifest,
)
from multitune.training.checkpoint import recording, remove_leftovers
from multitune.training.distributed import shard_backbone
from multitune.training.loop import LoopParts, StopSignal, TrainState, Validation, train
from multitune.training.schedules import Reptile
from multitune.training.zero import (
    ZeroOptimizer,
    ZeroSettings,
)

log = logging.getLogger(__name__)


def train_run(config: Config) -> Path:
    """Train a run from its config (or resume one); SIGTERM/SIGINT from here on end in a checkpoint."""
    with StopSignal() as stop, contextlib.ExitStack() as scratch:
        return _train_run(config, stop, scratch)


def _train_run(config: Config, stop: StopSignal, scratch: contextlib.ExitStack) -> Path:
    """`scratch` holds the recording of the temporary paths this process makes in the run directory."""
    resume_dir, checkpoint = find_resume(config)  # before any work: a config mismatch fails fast
    if resume_dir is not None and checkpoint is not None and run_is_complete(resume_dir, checkpoint):
        print(
            f"{resume_dir} is complete (its metrics.json holds the final scores): nothing to resume;"
            f" `multitune evaluate {resume_dir}` scores it again",
            file=sys.stderr,
        )
        return resume_dir
    prepared = prepare(config, resume_dir)
    scratch.callback(prepared.close)  # the streamed splits' reader thread and tokenizing processes
    refinement_targets(prepared.model, config.training.schedule)  # a refinement it cannot take fails first
    training = config.training
    sampler, balancer, streams = _components(config, prepared)
    accelerator, group, zero = _launch(config, balancer)
    run_dir = _run_dir(config, prepared, group, resume_dir, checkpoint, scratch)
    model, optimizer, scheduler = _place(prepared.model, balancer, training, accelerator, group, zero)
    unwrapped = accelerator.unwrap_model(model)
    guard = build_guard(config.guard, list(prepared.tasks), balancer, training.steps)
    regularizers = build_regularizers(config.regularization, unwrapped)  # before restore: θ⁰ = the start
    schedule = training.schedule
    reptile = Reptile(unwrapped, schedule.inner_steps, schedule.meta_lr) if schedule.name == "reptile" else None
    parts = TrainingParts(unwrapped, optimizer, scheduler, sampler, balancer, streams, guard, reptile, group.sharded)
    state = TrainState()
    if checkpoint is not None:
        state = parts.restore(checkpoint)
        if group.main:
            keep_history_until(run_dir / "history.jsonl", state.step, parts.history_bytes)
    session = Session(run_dir, main=group.main)
    relations = Relations.for_run(config, prepared, guard, accelerator.device, state, session)

    def score(split: str) -> dict[str, dict[str, Any]]:
        return prepared.score(split, accelerator.device, model, progress=training.progress and group.main)

    hooks = session.hooks(
        score,
        lambda: parts.whole_weights(group),
        lambda s: parts.save_checkpoint(run_dir, s, training.keep_checkpoints, group, session.history_bytes()),
        stop,
        relations.measure,
        relations.observe,
    )
    collate_rows = build_collate(training, config.model.max_length)
    loop = LoopParts(
        model, streams, sampler, balancer, optimizer, scheduler, accelerator, group, reptile, regularizers, collate_rows
    )
    session.open(training.tensorboard)
    try:
        state = train(loop, loop_settings(training, config.run.seed, prepared.pad_id), state, hooks)
    finally:
        session.close()
    group.barrier()
    if not group.main and not group.sharded:  # the main process evaluates and writes the results
        return run_dir
    session.restore_best(unwrapped, group.sharded or parts.zero)
    if prepared.model.task_adapters is not None:
        prepared.model.task_adapters.save(prepared.model.backbone, run_dir / "adapters")
    results = score("test")  # a sharded model needs every process in each forward
    choosing = schedule.name == "two_stage" and schedule.keep == "best"  # the shared model's own validation
    validation = score("validation") if choosing else None
    if group.main:
        _finish(config, prepared, session, state, balancer, accelerator, results, relations, validation)
    return run_dir


def _components(config: Config, prepared: Prepared) -> tuple[TaskSampler, Balancer, dict[str, RowStream[Encoded]]]:
    """The sampler, the balancer and each task's training stream, built from their config groups."""
    tasks, training = prepared.tasks, config.training
    sizes = {name: task.train_rows for name, task in tasks.items()}
    sampling_weights = {name: task.config.sampling_weight for name, task in tasks.items()}
    sampler = build_sampler(config.sampling, sizes, sampling_weights, training.steps, training.schedule)
    if training.mix_by == "tokens":  # the probabilities share out tokens: drawn ∝ p / mean row length
        rows = {name: prepared.training_sample(name) for name in tasks}
        sampler = token_mix(
            sampler, {name: sum(len(r.input_ids) for r in got) / len(got) for name, got in rows.items()}
        )
    loss_weights = {name: task.loss_weight for name, task in config.tasks.items()}
    balancer = build_balancer(
        config.loss_weighting, config.gradient_aggregation, list(tasks), loss_weights, config.run.seed
    )
    require_shared_parameters(prepared.model, balancer)
    if (still := still_loss_weights(balancer.weighting, training)) is not None:
        log.warning(still)
    streams = {name: prepared.training_stream(name, f"{config.run.seed}:{name}:stream") for name in tasks}
    return sampler, balancer, streams


def _launch(config: Config, balancer: Balancer) -> tuple[Any, Processes, ZeroSettings | None]:
    """accelerate's Accelerator, this process's place in the group, and DeepSpeed ZeRO's settings if used."""
    training = config.training
    accelerator, fsdp, zero = build_accelerator(training)
    group = from_accelerator(accelerator, sharded=training.fsdp or fsdp)
    if zero is not None and not group.several:  # nothing to partition: a ZeRO run resumes on one process
        log.warning("DeepSpeed ZeRO needs several processes; training on one process without it")
        zero = None
    if group.several:
        check_distributed(config, balancer, training.batch_size, group)
    return accelerator, group, zero


def _run_dir(
    config: Config,
    prepared: Prepared,
    group: Processes,
    resume_dir: Path | None,
    checkpoint: Path | None,
    scratch: contextlib.ExitStack,
) -> Path:
    """The run directory: the one resumed, or a new one holding the config, the task manifest and the
    backbone's config and tokenizer (written by the main process; the others learn its path)."""
    run_dir: Path | None = None
    if resume_dir is not None:
        run_dir = resume_dir
        if group.main:
            print(f"resuming {run_dir} from {checkpoint}", file=sys.stderr)
            remove_leftovers(run_dir)  # what a process killed in this run had recorded as its own
            scratch.enter_context(recording(run_dir))
            if prepared.rows_added:  # the run goes on with the new rows: the next resume compares with those
                write_json(run_dir / "tasks.json", task_manifest(prepared.tasks))
    elif group.main:
        run_dir = create_run_dir(config.run.output_dir, config.run.name)
        print(f"run directory: {run_dir}", file=sys.stderr)
        scratch.enter_context(recording(run_dir))
        write_text(run_dir / "config.yaml", dump_config(config))
        write_json(run_dir / "tasks.json", task_manifest(prepared.tasks))
        backbone_config: Any = prepared.backbone.model.config
        backbone_config.save_pretrained(run_dir / "backbone")
        prepared.backbone.tokenizer.save_pretrained(run_dir / "backbone")
    return Path(group.broadcast(str(run_dir) if run_dir is not None else None))


def _place(
    model: MultiTaskModel,
    balancer: Balancer,
    training: TrainingConfig,
    accelerator: Any,
    group: Processes,
    zero: ZeroSettings | None,
) -> tuple[Any, Any, Any]:
    """The model on its device (sharded across the processes with FSDP), its optimizer (under ZeRO, partitioned)
    and the learning-rate schedule. Several processes: gradients are summed by balanced_backward
    (training/distributed.py), not by DDP, and the scheduler steps once per global step."""
    from transformers import get_linear_schedule_with_warmup

    if group.several:
        model = model.to(accelerator.device)
        if group.sharded:  # before the optimizer: sharding replaces the backbone's parameters
            shard_backbone(model.backbone)
    optimizer: Any = build_optimizer(model, balancer.weighting, training)
    warmup = int(training.warmup_ratio * training.steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, training.steps)
    placed: Any = model
    if not group.several:
        placed, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    elif zero is not None:  # the scheduler keeps stepping the learning rates of the groups DeepSpeed steps
        optimizer = ZeroOptimizer(model, optimizer, zero, training.batch_size // group.world, group.world)
        if group.main:
            offload = ", optimizer state offloaded to the CPU" if zero.offload_optimizer == "cpu" else ""
            print(f"DeepSpeed ZeRO stage {zero.stage} over {group.world} processes{offload}", file=sys.stderr)
    if isinstance(balancer.weighting, torch.nn.Module):
        balancer.weighting.to(accelerator.device)
    return placed, optimizer, scheduler


@dataclass
class Relations:
    """Task relations measured at each validation (analysis.task_affinity, and for the guard), and the
    negative-transfer guard's decisions from them."""

    tracker: AffinityTracker | None
    guard: NegativeTransferGuard | None
    measure_batches: Callable[[], tuple[Any, Any]]  # -> (gradient cosine [T, T], lookahead affinity [T, T])
    state: TrainState
    session: Session
    lookahead: Any = None

    @classmethod
    def for_run(
        cls,
        config: Config,
        prepared: Prepared,
        guard: NegativeTransferGuard | None,
        device: torch.device,
        state: TrainState,
        session: Session,
    ) -> Relations:
        measured = config.analysis.task_affinity or guard is not None
        tracker = AffinityTracker(list(prepared.tasks)) if measured else None
        probes = probe_batches(prepared, config.training, config.run.seed) if measured else {}
        held_out = probe_batches(prepared, config.training, config.run.seed, "validation") if measured else {}

        def measure_batches() -> tuple[Any, Any]:
            return measure_relations(prepared.model, probes, held_out, device, config.analysis.lookahead_lr)

        return cls(tracker, guard, measure_batches, state, session)

    def measure(self, step: int) -> None:
        if self.tracker is not None:
            cosine, self.lookahead = self.measure_batches()
            self.tracker.add(step, cosine, self.lookahead)

    def observe(self, step: int, validation: Validation) -> None:
        if self.guard is None or self.lookahead is None:
            return
        rows = dict(self.state.task_rows)
        for action in self.guard.observe(step, validation.signed_scores, self.lookahead, rows):
            self.session.record({"step": step, "guard": action.as_dict()})
            print(
                f"guard, step {step}: {action.action} task '{action.task}' (scale {action.scale:g}): {action.why}",
                file=sys.stderr,
            )


def _finish(
    config: Config,
    prepared: Prepared,
    session: Session,
    state: TrainState,
    balancer: Balancer,
    accelerator: Any,
    results: dict[str, dict[str, Any]],
    relations: Relations,
    validation: dict[str, dict[str, Any]] | None = None,
) -> None:
    """The main process's end of a run: the two-stage copies (with `validation`, the shared model's per-task
    validation results: kept only where they beat it), metrics.json, affinity.json, the report."""
    run_dir = session.run_dir
    assert run_dir is not None
    stages: dict[str, Any] = {}
    if config.training.schedule.name == "two_stage":  # the deployment is one fine-tuned copy per task
        stages = {"multi_task_stage": {"tasks": results, "average_main_score": average_main_score(results)}}
        shared = None if validation is None else {n: {"validation": validation[n], "test": results[n]} for n in results}
        record = record_finetune(run_dir)
        results, seconds, kept = finetune_per_task(config, prepared, accelerator, run_dir, record, shared)
        stages["finetune_seconds"] = round(seconds, 2)
        stages["answered_by"] = kept  # per task: its refined copy, or the shared model
    metrics = session.metrics(results, state, balancer, prepared.model, accelerator.device, stages)
    session.write("metrics.json", metrics)
    if relations.tracker is not None:
        summary = relations.tracker.summary(config.analysis.groups)
        session.write("affinity.json", summary)
        print(format_relations(summary))
    write_report(run_dir)
    print(format_table(results, metrics["average_main_score"], PRINTED_TASKS, str(run_dir / "metrics.json")))
    ended = " (stopped early)" if state.stopped_early else ""
    print(f"trained {state.step} steps{ended} in {state.seconds:.1f} s; best validation at step {state.best_step}")
    print(f"saved to {run_dir}")


def resume_run(run_dir: str | Path) -> Path:
    """`multitune resume RUN_DIR`: the saved config, continued from the newest loadable checkpoint."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise MultitunError("not a multitune run: config.yaml is missing", file=str(run))
    settings = {"resume": str(run), "output_dir": str(run.parent), "name": run.name}
    return train_run(load_run_config(run / "config.yaml", settings))
