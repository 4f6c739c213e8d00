"""The YAML recipe, read top to bottom: config -> data -> model -> launch -> the training session ->
metrics.json and the report. A bad input fails before the run directory exists; an existing one is never
touched. `multitune resume` continues a run from its newest checkpoint."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from multitune.analysis.affinity import AffinityTracker
from multitune.catalogue import load_run_config
from multitune.config import Config, dump_config
from multitune.core.files import write_json, write_text
from multitune.core.processes import from_accelerator
from multitune.errors import MultitunError
from multitune.evaluation.evaluate import average_main_score, evaluate, format_table
from multitune.evaluation.report import write_report
from multitune.recipe.components import (
    build_balancer,
    build_collate,
    build_guard,
    build_optimizer,
    build_regularizers,
    build_sampler,
    build_stream,
    require_shared_parameters,
)
from multitune.recipe.launch import build_accelerator, check_distributed
from multitune.recipe.prepare import prepare
from multitune.recipe.probes import format_relations, measure_relations, probe_batches
from multitune.recipe.resume import TrainingParts, find_resume, keep_history_until, run_is_complete
from multitune.recipe.session import Session, loop_settings
from multitune.recipe.two_stage import finetune_per_task, record_finetune
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
)

log = logging.getLogger(__name__)


def train_run(config: Config) -> Path:
    """Train a run from its config (or resume one); SIGTERM/SIGINT from here on end in a checkpoint."""
    with StopSignal() as stop, contextlib.ExitStack() as scratch:
        return _train_run(config, stop, scratch)


def _train_run(config: Config, stop: StopSignal, scratch: contextlib.ExitStack) -> Path:
    """`scratch` holds the recording of the temporary paths this process makes in the run directory."""
    from transformers import get_linear_schedule_with_warmup

    resume_dir, checkpoint = find_resume(config)  # before any work: a config mismatch fails fast
    if resume_dir is not None and checkpoint is not None and run_is_complete(resume_dir, checkpoint):
        print(
            f"{resume_dir} is complete (its metrics.json holds the final scores): nothing to resume;"
            f" `multitune evaluate {resume_dir}` scores it again",
            file=sys.stderr,
        )
        return resume_dir
    prepared = prepare(config, resume_dir)
    tasks, model, training = prepared.tasks, prepared.model, config.training
    sizes = {name: len(task.splits["train"]) for name, task in tasks.items()}
    sampling_weights = {name: task.config.sampling_weight for name, task in tasks.items()}
    sampler = build_sampler(config.sampling, sizes, sampling_weights, training.steps, training.schedule)
    loss_weights = {name: task.loss_weight for name, task in config.tasks.items()}
    balancer = build_balancer(
        config.loss_weighting, config.gradient_aggregation, list(tasks), loss_weights, config.run.seed
    )
    require_shared_parameters(model, balancer)
    streams = {
        name: build_stream(prepared.encoded[name]["train"], f"{config.run.seed}:{name}:stream", training)
        for name in tasks
    }

    accelerator, fsdp, zero = build_accelerator(training)
    group = from_accelerator(accelerator, sharded=training.fsdp or fsdp)
    if zero is not None and not group.several:  # nothing to partition: a ZeRO run resumes on one process
        log.warning("DeepSpeed ZeRO needs several processes; training on one process without it")
        zero = None
    if group.several:
        check_distributed(config, balancer, training.batch_size, group)
    if resume_dir is not None:
        run_dir = resume_dir
        if group.main:
            print(f"resuming {run_dir} from {checkpoint}", file=sys.stderr)
            remove_leftovers(run_dir)  # what a process killed in this run had recorded as its own
            scratch.enter_context(recording(run_dir))
            if prepared.rows_added:  # the run goes on with the new rows: the next resume compares with those
                write_json(run_dir / "tasks.json", task_manifest(tasks))
    elif group.main:
        run_dir = create_run_dir(config.run.output_dir, config.run.name)
        print(f"run directory: {run_dir}", file=sys.stderr)
        scratch.enter_context(recording(run_dir))
        write_text(run_dir / "config.yaml", dump_config(config))
        write_json(run_dir / "tasks.json", task_manifest(tasks))
        backbone_config: Any = prepared.backbone.model.config
        backbone_config.save_pretrained(run_dir / "backbone")
        prepared.backbone.tokenizer.save_pretrained(run_dir / "backbone")
    run_dir = Path(group.broadcast(str(run_dir) if group.main or resume_dir is not None else None))

    if group.several:  # gradients are summed by balanced_backward (training/distributed.py), not by DDP,
        model = model.to(accelerator.device)  # and the scheduler steps once per global step (not once per process)
        if group.sharded:  # before the optimizer: sharding replaces the backbone's parameters
            shard_backbone(model.backbone)
    optimizer: Any = build_optimizer(model, balancer.weighting, training)
    warmup = int(training.warmup_ratio * training.steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, training.steps)
    if not group.several:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    elif zero is not None:  # the scheduler keeps stepping the learning rates of the groups DeepSpeed steps
        optimizer = ZeroOptimizer(model, optimizer, zero, training.batch_size // group.world, group.world)
        if group.main:
            offload = ", optimizer state offloaded to the CPU" if zero.offload_optimizer == "cpu" else ""
            print(f"DeepSpeed ZeRO stage {zero.stage} over {group.world} processes{offload}", file=sys.stderr)
    if isinstance(balancer.weighting, torch.nn.Module):
        balancer.weighting.to(accelerator.device)
    guard = build_guard(config.guard, list(tasks), balancer, training.steps)
    regularizers = build_regularizers(
        config.regularization, accelerator.unwrap_model(model)
    )  # before restore: θ⁰ = the start
    schedule = training.schedule
    reptile = (
        Reptile(accelerator.unwrap_model(model), schedule.inner_steps, schedule.meta_lr)
        if schedule.name == "reptile"
        else None
    )
    parts = TrainingParts(
        accelerator.unwrap_model(model), optimizer, scheduler, sampler, balancer, streams, guard, reptile, group.sharded
    )
    state = TrainState()
    if checkpoint is not None:
        state = parts.restore(checkpoint)
        if group.main:
            keep_history_until(run_dir / "history.jsonl", state.step, parts.history_bytes)
    session = Session(run_dir, main=group.main)

    measure = config.analysis.task_affinity or guard is not None
    tracker = AffinityTracker(list(tasks)) if measure else None
    probes = probe_batches(prepared, config) if tracker is not None else {}
    held_out = probe_batches(prepared, config, "validation") if tracker is not None else {}
    lookahead: dict[str, Any] = {}

    def measure_tasks(step: int) -> None:
        if tracker is not None:
            cosine, lookahead["matrix"] = measure_relations(
                prepared.model, probes, held_out, accelerator.device, config.analysis.lookahead_lr
            )
            tracker.add(step, cosine, lookahead["matrix"])

    def observe(step: int, validation: Validation) -> None:
        if guard is None or lookahead.get("matrix") is None:
            return
        for action in guard.observe(step, validation.signed_scores, lookahead["matrix"], dict(state.task_rows)):
            session.record({"step": step, "guard": action.as_dict()})
            print(
                f"guard, step {step}: {action.action} task '{action.task}' (scale {action.scale:g}): {action.why}",
                file=sys.stderr,
            )

    def score(split: str) -> dict[str, dict[str, Any]]:
        return evaluate(
            model,
            tasks,
            prepared.scored,
            split,
            training.eval_batch_size,
            accelerator.device,
            prepared.pad_id,
            progress=training.progress and group.main,
        )

    hooks = session.hooks(
        score,
        lambda: parts.whole_weights(group),
        lambda s: parts.save_checkpoint(run_dir, s, training.keep_checkpoints, group, session.history_bytes()),
        stop,
        measure_tasks,
        observe,
    )
    loop = LoopParts(
        model,
        streams,
        sampler,
        balancer,
        optimizer,
        scheduler,
        accelerator,
        group,
        reptile,
        regularizers,
        build_collate(training, config.model.max_length),
    )
    session.open(training.tensorboard)
    try:
        state = train(loop, loop_settings(training, config.run.seed, prepared.pad_id), state, hooks)
    finally:
        session.close()

    group.barrier()
    if not group.main and not group.sharded:  # the main process evaluates and writes the results
        return run_dir
    session.restore_best(accelerator.unwrap_model(model), group.sharded or parts.zero)
    if prepared.model.task_adapters is not None:
        prepared.model.task_adapters.save(prepared.model.backbone, run_dir / "adapters")
    results = score("test")  # a sharded model needs every process in each forward
    if not group.main:
        return run_dir
    stages: dict[str, Any] = {}
    if schedule.name == "two_stage":  # the deployment is one fine-tuned copy per task
        stages = {"multi_task_stage": {"tasks": results, "average_main_score": average_main_score(results)}}
        results, seconds = finetune_per_task(config, prepared, accelerator, run_dir, record_finetune(run_dir))
        stages["finetune_seconds"] = round(seconds, 2)
    average = average_main_score(results)
    metrics = session.metrics(results, state, balancer, prepared.model, accelerator.device, stages)
    session.write("metrics.json", metrics)
    if tracker is not None:
        relations = tracker.summary(config.analysis.groups)
        write_json(run_dir / "affinity.json", relations)
        print(format_relations(relations))
    write_report(run_dir)
    print(format_table(results, average))
    ended = " (stopped early)" if state.stopped_early else ""
    print(f"trained {state.step} steps{ended} in {state.seconds:.1f} s; best validation at step {state.best_step}")
    print(f"saved to {run_dir}")
    return run_dir


def resume_run(run_dir: str | Path) -> Path:
    """`multitune resume RUN_DIR`: the saved config, continued from the newest loadable checkpoint."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise MultitunError("not a multitune run: config.yaml is missing", file=str(run))
    settings = {"resume": str(run), "output_dir": str(run.parent), "name": run.name}
    return train_run(load_run_config(run / "config.yaml", settings))
