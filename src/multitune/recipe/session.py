"""The training session the YAML recipe runs, read top to bottom: config -> data -> model -> train ->
evaluate -> metrics.json. A bad input fails before the run directory exists; an existing one is never
touched."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from multitune.analysis.affinity import AffinityTracker
from multitune.catalogue import load_run_config
from multitune.config import Config, dump_config
from multitune.core.files import WEIGHTS_FILE, write_json, write_text
from multitune.core.processes import from_accelerator
from multitune.errors import ConfigError, MultitunError
from multitune.evaluation.evaluate import average_main_score, evaluate, format_table
from multitune.evaluation.report import write_report
from multitune.recipe.components import (
    batch_collate,
    build_balancer,
    build_guard,
    build_regularizers,
    build_sampler,
    optimizer_for,
    require_shared_parameters,
    task_stream,
)
from multitune.recipe.launch import check_distributed, make_accelerator
from multitune.recipe.prepare import prepare
from multitune.recipe.probes import format_relations, measure_relations, probe_batches
from multitune.recipe.resume import TrainingParts, find_resume, keep_history_until, run_is_complete, synced_size
from multitune.recipe.two_stage import finetune_per_task, record_finetune
from multitune.runs.layout import (
    create_run_dir,
    task_manifest,
)
from multitune.training.checkpoint import load_weights, recording, remove_leftovers
from multitune.training.distributed import shard_backbone
from multitune.training.loop import EarlyStopping, LoopSettings, StopSignal, TrainState, Validation, train
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
    sampler = build_sampler(config, tasks)
    balancer = build_balancer(config, list(tasks))
    require_shared_parameters(model, balancer)
    streams = {
        name: task_stream(prepared.encoded[name]["train"], f"{config.run.seed}:{name}:stream", training)
        for name in tasks
    }

    accelerator, fsdp, zero = make_accelerator(training)
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
    optimizer: Any = optimizer_for(model, balancer.weighting, config)
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
    guard = build_guard(config, list(tasks), balancer)
    regularizers = build_regularizers(config, accelerator.unwrap_model(model))  # before restore: θ⁰ = the start
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
    history = (run_dir / "history.jsonl").open("a", encoding="utf-8") if group.main else None
    scalars = tensorboard_writer(run_dir) if training.tensorboard and group.main else None

    def record(entry: dict[str, Any]) -> None:
        if history is None:  # only the main process writes
            return
        history.write(json.dumps(entry) + "\n")
        history.flush()
        if scalars is not None:
            write_scalars(scalars, entry)

    measure = config.analysis.task_affinity or guard is not None
    tracker = AffinityTracker(list(tasks)) if measure else None
    probes = probe_batches(prepared, config) if tracker is not None else {}
    held_out = probe_batches(prepared, config, "validation") if tracker is not None else {}

    def validate(step: int) -> Validation:
        lookahead = None
        if tracker is not None:
            cosine, lookahead = measure_relations(
                prepared.model, probes, held_out, accelerator.device, config.analysis.lookahead_lr
            )
            tracker.add(step, cosine, lookahead)
        results = evaluate(
            model,
            tasks,
            prepared.scored,
            "validation",
            training.eval_batch_size,
            accelerator.device,
            prepared.pad_id,
            progress=training.progress and group.main,
        )
        score = average_main_score(results)
        record({"step": step, "validation": {n: r["metrics"] for n, r in results.items()}, "average_main_score": score})
        log.info("step %d: validation average main score %.4f", step, score)
        scores = {name: r["main_score"] if r["higher_is_better"] else -r["main_score"] for name, r in results.items()}
        if guard is not None and lookahead is not None:
            for action in guard.observe(step, scores, lookahead, dict(state.task_rows)):
                record({"step": step, "guard": action.as_dict()})
                print(
                    f"guard, step {step}: {action.action} task '{action.task}' (scale {action.scale:g}): {action.why}",
                    file=sys.stderr,
                )
        return Validation(score, {name: r["main_score"] for name, r in results.items()}, scores)

    settings = LoopSettings(
        steps=training.steps,
        batch_size=training.batch_size,
        seed=config.run.seed,
        pad_id=prepared.pad_id,
        mixed_batches=training.mixed_batches,
        max_grad_norm=training.max_grad_norm,
        eval_every=training.eval_every,
        log_every=training.log_every,
        checkpoint_every=training.checkpoint_every,
        max_nonfinite_steps=training.max_nonfinite_steps,
        progress=training.progress,
        early_stopping=EarlyStopping(**training.early_stopping.model_dump()) if training.early_stopping else None,
        reptile=reptile,
        processes=group,
        gradient_accumulation=training.gradient_accumulation,
    )
    try:
        state = train(
            model,
            streams,
            sampler,
            balancer,
            optimizer,
            scheduler,
            accelerator,
            settings,
            state,
            validate,
            lambda step: parts.save_weights(run_dir / WEIGHTS_FILE, group),
            lambda s: parts.save_checkpoint(run_dir, s, training.keep_checkpoints, group, synced_size(history)),
            record,
            stop,
            regularizers,
            batch_collate(config),
        )
    finally:
        if history is not None:
            history.close()
        if scalars is not None:
            scalars.close()

    group.barrier()
    if not group.main and not group.sharded:  # the main process evaluates and writes the results
        return run_dir
    load_weights(accelerator.unwrap_model(model), run_dir / WEIGHTS_FILE, group.sharded or parts.zero)
    if prepared.model.task_adapters is not None:
        prepared.model.task_adapters.save(prepared.model.backbone, run_dir / "adapters")
    results = evaluate(  # a sharded model needs every process in each forward
        model,
        tasks,
        prepared.scored,
        "test",
        training.eval_batch_size,
        accelerator.device,
        prepared.pad_id,
        progress=training.progress and group.main,
    )
    if not group.main:
        return run_dir
    stages: dict[str, Any] = {}
    if schedule.name == "two_stage":  # the deployment is one fine-tuned copy per task
        stages = {"multi_task_stage": {"tasks": results, "average_main_score": average_main_score(results)}}
        results, seconds = finetune_per_task(config, prepared, accelerator, run_dir, record_finetune(run_dir))
        stages["finetune_seconds"] = round(seconds, 2)
    average = average_main_score(results)
    metrics = {
        "tasks": results,
        "average_main_score": average,
        **stages,
        "train_seconds": round(state.seconds, 2),
        "steps": state.step,
        "best_step": state.best_step,
        "validation_average_main_score": round(state.best_score, 6),
        "task_steps": state.task_steps,
        "task_rows": state.task_rows,
        "skipped_steps": state.skipped_steps,
        "stopped_early": state.stopped_early,
        "stopped_tasks": state.stopped_tasks,
        "task_scale": dict(balancer.task_scale),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "parameters": {
            "shared": sum(p.numel() for p in prepared.model.shared_parameters()),
            "heads": {name: sum(p.numel() for p in prepared.model.task_parameters(name)) for name in tasks},
        },
    }
    write_json(run_dir / "metrics.json", metrics)
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
    """Peak accelerator memory of this process, or on the CPU its peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def resume_run(run_dir: str | Path) -> Path:
    """`multitune resume RUN_DIR`: the saved config, continued from the newest loadable checkpoint."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise MultitunError("not a multitune run: config.yaml is missing", file=str(run))
    settings = {"resume": str(run), "output_dir": str(run.parent), "name": run.name}
    return train_run(load_run_config(run / "config.yaml", settings))
