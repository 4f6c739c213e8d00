"""The wiring, read top to bottom: config -> data -> model -> train -> evaluate -> metrics.json.

Everything that can fail on the user's input (config, data, backbone) runs before the run directory is
created, so a bad input never leaves a half-written run behind, and an existing directory is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from multitune.analysis.affinity import NO_SELF_TRANSFER, AffinityTracker, cosine_matrix, lookahead_affinity
from multitune.analysis.guard import NegativeTransferGuard
from multitune.balancing.backward import Balancer
from multitune.balancing.gradients import GRADIENT_AGGREGATORS, GramianAggregator, gramian
from multitune.balancing.losses import LOSS_WEIGHTINGS, LossWeighting
from multitune.config import (
    Config,
    GradientConfig,
    MethodConfig,
    TaskConfig,
    TrainingConfig,
    dump_config,
    load_run_config,
)
from multitune.core.files import atomic_write, write_json, write_text
from multitune.core.processes import Processes, from_accelerator
from multitune.core.rng import rng_state, set_rng_state
from multitune.data.collate import Batch, collate, pack
from multitune.data.encoding import Encoded, encode
from multitune.data.readers import Row, json_rows, read_jsonl
from multitune.data.samplers import SAMPLERS, ObservesTraining, TaskSampler
from multitune.data.streams import TaskStream
from multitune.data.tasks import (
    Example,
    TaskData,
    label_field_name,
    load_tasks,
    split_source,
)
from multitune.data.windows import PredictionRow, encode_for_tagging, windowed
from multitune.errors import ConfigError, DataError, MultitunError
from multitune.evaluation.evaluate import average_main_score, evaluate, format_table, predict
from multitune.evaluation.report import write_report
from multitune.models.architectures import ARCHITECTURES
from multitune.models.backbone import Backbone, backbone_from_run, load_backbone
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
from multitune.models.regularization import L2SP, Regularizer
from multitune.training.checkpoint import (
    PREFIX,
    WEIGHTS_FILE,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    recording,
    remove_leftovers,
    save_checkpoint,
    save_weights,
)
from multitune.training.distributed import full_optimizer_state, full_state_dict, shard_backbone, shard_optimizer_state_
from multitune.training.loop import EarlyStopping, LoopSettings, StopSignal, TrainState, Validation, train
from multitune.training.schedules import Reptile
from multitune.training.zero import (
    ZeroAccelerator,
    ZeroOptimizer,
    ZeroSettings,
    check_zero,
    import_deepspeed,
    zero_from_accelerate,
)

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A model with its tasks and tokenized splits, ready to train or evaluate."""

    config: Config
    tasks: dict[str, TaskData]
    backbone: Backbone
    model: MultiTaskModel
    encoded: dict[str, dict[str, list[Encoded]]]  # task -> split -> rows
    scored: dict[str, dict[str, Sequence[PredictionRow]]]  # the rows evaluation predicts (token tasks: windows)
    rows_added: bool = False  # resuming: rows were appended to the data since the run started

    @property
    def pad_id(self) -> int:
        pad = self.backbone.tokenizer.pad_token_id
        return int(pad if pad is not None else 0)


def build_model(config: Config, tasks: dict[str, TaskData], backbone: Backbone) -> MultiTaskModel:
    heads = {
        name: HEADS.build(
            task.config.type,
            hidden_size=backbone.hidden_size,
            num_labels=len(task.labels or [None]),
            dropout=config.model.dropout if task.config.dropout is None else task.config.dropout,
        )
        for name, task in tasks.items()
        if task.config.type != "generation"  # a generation task trains the causal LM's own head
    }
    architecture = config.model.architecture
    model: MultiTaskModel
    if config.model.kind in ("causal_lm", "seq2seq"):  # the LM is shared, tasks other than generation get heads
        generative = [name for name, task in tasks.items() if task.config.type == "generation"]
        build = build_causal_model if config.model.kind == "causal_lm" else build_seq2seq_model
        model = build(backbone, heads, generative, config.model.pooling)
    else:
        model = ARCHITECTURES.build(
            architecture.name,
            injected={
                "backbone": backbone.model,
                "heads": heads,
                "pooling": config.model.pooling,
                "hidden_size": backbone.hidden_size,
            },
            **architecture.params,
        )
    if config.model.peft is not None:
        model.attach_adapters(TaskAdapters(model.backbone, list(tasks), **config.model.peft.model_dump()))
    return model


def build_regularizers(config: Config, model: MultiTaskModel) -> list[Regularizer]:
    """The architecture's own penalties plus L2-SP toward the weights the model starts from."""
    out = model.regularizers()
    settings = config.regularization
    if settings.l2_sp_alpha or settings.l2_sp_beta:
        pretrained = list(model.pretrained_parameters())
        known = {id(p) for p in pretrained}
        new = [p for p in model.parameters() if id(p) not in known]
        out.append(L2SP(pretrained, new, settings.l2_sp_alpha, settings.l2_sp_beta))
    return out


def encode_splits(
    tasks: dict[str, TaskData], tokenizer: Any, max_length: int, decoder_targets: bool = False
) -> dict[str, dict[str, list[Encoded]]]:
    return {
        name: {
            split: encode(examples, task, tokenizer, max_length, decoder_targets=decoder_targets)
            for split, examples in task.splits.items()
        }
        for name, task in tasks.items()
    }


def scoring_rows(
    tasks: dict[str, TaskData], encoded: dict[str, dict[str, list[Encoded]]], tokenizer: Any, max_length: int
) -> dict[str, dict[str, Sequence[PredictionRow]]]:
    """What evaluation predicts: the encoded rows, except that a token task's sentence longer than max_length
    is tagged in windows (as `predict` and `serve` tag it) instead of having its words past the cut-off
    scored as `O`."""
    scored: dict[str, dict[str, Sequence[PredictionRow]]] = {}
    for name, task in tasks.items():
        scored[name] = dict(encoded[name])
        if task.config.type == "token_classification":
            for split in ("validation", "test"):
                if split in encoded[name]:
                    rows = [replace(row, label=None) for row in encoded[name][split]]  # windows carry none
                    scored[name][split] = windowed(task.splits[split], rows, task, tokenizer, max_length)
    return scored


LOADERS = {"causal_lm": load_causal_lm, "seq2seq": load_seq2seq_lm}
FROM_RUN = {"causal_lm": causal_lm_from_run, "seq2seq": seq2seq_lm_from_run}


def prepare(config: Config, resumed: Path | None = None) -> Prepared:
    """`resumed`: the run directory being resumed, whose data the tasks must still match."""
    torch.manual_seed(config.run.seed)
    tasks = load_tasks(config.tasks, config.run.seed, config.model.trust_remote_code)
    rows_added = match_resumed_data(resumed, tasks) if resumed is not None else False
    model_config = config.model
    loader = LOADERS.get(model_config.kind, load_backbone)
    backbone = loader(
        model_config.backbone, model_config.revision, model_config.trust_remote_code, model_config.random_init
    )
    torch.manual_seed(config.run.seed)  # heads start the same whatever loading consumed
    model = build_model(config, tasks, backbone)
    if model_config.init_from:
        load_backbone_weights(model, Path(model_config.init_from))
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if model_config.attn_implementation is not None:
        for module in backbone_modules(model):
            module.set_attn_implementation(model_config.attn_implementation)  # type: ignore[operator]
    if isinstance(model, CausalLMMultiTask):
        model.loss_chunk = model_config.lm_loss_chunk
    if config.training.compile:
        compile_backbone(model)
    encoded = encode_splits(tasks, backbone.tokenizer, model_config.max_length, model_config.kind == "seq2seq")
    scored = scoring_rows(tasks, encoded, backbone.tokenizer, model_config.max_length)
    return Prepared(config, tasks, backbone, model, encoded, scored, rows_added)


def backbone_modules(model: MultiTaskModel) -> list[torch.nn.Module]:
    """The Hugging Face model(s) of a multi-task model (one per task under soft sharing)."""
    return list(model.backbone.values()) if isinstance(model.backbone, torch.nn.ModuleDict) else [model.backbone]


def compile_backbone(model: MultiTaskModel) -> None:
    """torch.compile, in place, the module(s) each forward runs: the backbone(s), or a causal LM's body
    (its LM head runs separately, only at labelled positions). Dynamic shapes: batches vary in length."""
    modules = [model.body] if isinstance(model, CausalLMMultiTask) else backbone_modules(model)
    for module in modules:
        module.compile(dynamic=True)


def task_stream(rows: list[Encoded], seed: str, training: Any) -> TaskStream[Encoded]:
    """One task's training stream; length-grouped in groups of a batch when asked."""
    if not training.group_by_length:
        return TaskStream(rows, seed)
    return TaskStream(rows, seed, training.batch_size, [len(row.input_ids) for row in rows])


def batch_collate(config: Config) -> Callable[[dict[str, list[Encoded]], int], Batch]:
    """Padded batches, or (training.packing) packed rows of pack_length tokens."""
    if not config.training.packing:
        return collate
    length = config.training.pack_length or config.model.max_length
    return lambda rows, pad_id: pack(rows, pad_id, length)


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


def make_accelerator(training: TrainingConfig) -> tuple[Any, bool, ZeroSettings | None]:
    """accelerate's Accelerator (launched as several processes without a GPU, they train on CPUs, gloo);
    whether the backbone is to be sharded (training.fsdp, or an accelerate config asking for FSDP: multitune
    shards it itself, training/distributed.py); and the DeepSpeed ZeRO settings (training.deepspeed, or an
    accelerate DeepSpeed config: multitune drives the engine itself, training/zero.py)."""
    import os

    from accelerate import Accelerator

    several_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    zero = zero_from_accelerate()
    if training.deepspeed is not None:  # the run's own config wins
        zero = ZeroSettings(training.deepspeed.stage, training.deepspeed.offload_optimizer)
    if zero is not None:
        check_zero(zero, training)
        import_deepspeed()  # accelerate's DeepSpeed state needs it, and its CPU accelerator without a GPU
    accelerator = Accelerator(mixed_precision=training.mixed_precision, cpu=several_cpus)
    engine = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if engine == "DEEPSPEED":  # with a GPU: accelerate would drive an engine of its own
        accelerator = ZeroAccelerator(accelerator, training.mixed_precision)
    elif engine == "MEGATRON_LM":
        raise ConfigError(
            "accelerate is configured for MEGATRON_LM, which multitune does not drive: use data parallel, "
            "training.fsdp=true or DeepSpeed ZeRO"
        )
    if zero is not None and engine == "FSDP":
        raise ConfigError("choose one of FSDP and DeepSpeed ZeRO", field=zero.source)
    return accelerator, engine == "FSDP", zero


def check_distributed(config: Config, balancer: Balancer, batch_size: int, group: Processes) -> None:
    """What training on several processes needs (training/distributed.py)."""
    if batch_size < group.world:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch: it needs at least one row per process ({group.world})",
            field="training.batch_size",
        )
    aggregator = balancer.aggregator
    if group.sharded:
        check_sharded(config, balancer)
    if balancer.source == "representation" and aggregator is not None and not isinstance(aggregator, GramianAggregator):
        name = config.gradient_aggregation.name if config.gradient_aggregation else ""
        raise ConfigError(
            f"with several processes, '{name}' needs the parameters source (on the representation source only"
            " the Gramian-based methods are exact)",
            field="gradient_aggregation.source",
        )


def check_sharded(config: Config, balancer: Balancer) -> None:
    """What a sharded backbone (FSDP) does not support: anything needing whole per-task gradients of the
    shared weights, or copies of them."""
    training = config.training
    refused = {
        "gradient_aggregation.source": balancer.aggregator is not None and balancer.source == "parameters",
        # the others run the backbone layer by layer or keep one per task: FSDP2 gathers a unit's weights
        # only when that unit's own forward runs
        "model.architecture.name": config.model.architecture.name != "hard",
        "analysis.task_affinity": config.analysis.task_affinity,
        "guard.enabled": config.guard.enabled,
        "training.schedule.name": training.schedule.name in ("reptile", "two_stage"),
        "regularization": bool(config.regularization.l2_sp_alpha or config.regularization.l2_sp_beta),
        "model.peft": config.model.peft is not None,
        "training.compile": training.compile,
    }
    for field, on in refused.items():
        if on:
            raise ConfigError("not available with a sharded backbone (FSDP) yet", field=field)


def build_sampler(config: Config, tasks: dict[str, TaskData]) -> TaskSampler:
    """The config's sampler; the sequential schedule replaces it with its curriculum."""
    sizes = {name: len(task.splits["train"]) for name, task in tasks.items()}
    weights = {name: task.config.sampling_weight for name, task in tasks.items()}
    schedule = config.training.schedule
    if schedule.name == "sequential":
        injected = {"sizes": sizes, "weights": weights, "total_steps": config.training.steps}
        return SAMPLERS.build("sequential", injected=injected, order=schedule.order, fractions=schedule.fractions)
    return make_sampler(config.sampling, sizes, weights, config.training.steps)


def make_sampler(
    sampling: MethodConfig, sizes: dict[str, int], weights: dict[str, float], total_steps: int
) -> TaskSampler:
    """A sampler from its registry: the method's own parameters plus the task sizes, weights and steps."""
    injected = {"sizes": sizes, "weights": weights, "total_steps": total_steps}
    return SAMPLERS.build(sampling.name, injected=injected, **sampling.params)


def build_balancer(config: Config, task_names: list[str]) -> Balancer:
    loss_weights = {n: t.loss_weight for n, t in config.tasks.items()}
    return make_balancer(config.loss_weighting, config.gradient_aggregation, task_names, loss_weights, config.run.seed)


def make_balancer(
    loss_weighting: MethodConfig,
    gradient: GradientConfig | None,
    task_names: list[str],
    loss_weights: dict[str, float],
    seed: int,
) -> Balancer:
    """A loss weighting and, optionally, a gradient aggregator with its source, built from their registries."""
    weighting = LOSS_WEIGHTINGS.build(
        loss_weighting.name,
        injected={"task_names": task_names, "loss_weights": loss_weights, "seed": seed},
        **loss_weighting.params,
    )
    if gradient is None:
        return Balancer(weighting)
    aggregator = GRADIENT_AGGREGATORS.build(
        gradient.name, injected={"task_names": task_names, "seed": seed}, **gradient.params
    )
    dtype = torch.bfloat16 if gradient.buffer_dtype == "bfloat16" else torch.float32
    return Balancer(weighting, aggregator, gradient.source, dtype)


def require_shared_parameters(model: MultiTaskModel, balancer: Balancer) -> None:
    """The `parameters` gradient source needs trainable shared parameters to take per-task gradients of."""
    if balancer.source == "parameters" and not any(p.requires_grad for p in model.shared_parameters()):
        raise ConfigError(
            "gradient source 'parameters' needs trainable shared parameters, and this model has none "
            "(per-task adapters on a frozen backbone, or soft sharing): use source 'representation' or "
            "peft.shared=true",
            field="gradient_aggregation.source",
        )


def create_run_dir(output_dir: str, name: str) -> Path:
    """A new, empty run directory: `name`, or `name-2`, `name-3`... if taken. Never reuses one."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            path = root / (name if attempt == 1 else f"{name}-{attempt}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise ConfigError(
            f"cannot create the run directory: {error.strerror or error}", file=str(root), field="run.output_dir"
        ) from None
    raise ConfigError("too many runs with this name", file=str(root), field="run.name")


def task_manifest(tasks: dict[str, TaskData]) -> dict[str, Any]:
    return {
        name: {
            "type": task.config.type,
            "labels": task.labels,
            "target_mean": task.target_mean,
            "target_std": task.target_std,
            **target_range(task),
            "rows": {split: len(examples) for split, examples in task.splits.items()},
            "notes": task.notes,
            "fingerprint": data_fingerprint(task),
        }
        for name, task in tasks.items()
    }


def target_range(task: TaskData) -> dict[str, float]:
    """A regression task's smallest and largest training target: predict and serve hold their answers to
    this range (run.held_to_range). Nothing for other tasks."""
    targets = [float(e.label) for e in task.splits.get("train", []) if isinstance(e.label, (int, float))]
    if task.config.type != "regression" or not targets:
        return {}
    return {"target_min": min(targets), "target_max": max(targets)}


def data_fingerprint(task: TaskData) -> dict[str, dict[str, Any]]:
    """Per data file (or dataset split) of a task, its rows in file order: how many, and a sha256 over their
    texts and labels as read. Rows appended to a file keep the digest of the rows before them, so resume
    tells added rows from changed ones."""
    return {file: {"rows": len(rows), "sha256": _digest(rows)[0]} for file, rows in _rows_by_file(task).items()}


def _rows_by_file(task: TaskData) -> dict[str, list[Example]]:
    """Every split's examples regrouped by the file they came from, in line order (so a validation split
    carved from train counts as part of the train file again)."""
    by_file: dict[str, list[Example]] = {}
    for examples in task.splits.values():
        for example in examples:
            by_file.setdefault(example.file, []).append(example)
    return {file: sorted(rows, key=lambda e: e.line) for file, rows in by_file.items()}


def _carved_files(task: TaskData) -> set[str]:
    """The files a task's train split is read from, when its validation split was carved from them (a carve
    takes validation rows from the train files; a validation source has files, or a dataset split, of its
    own); empty otherwise. The carve shuffles all train rows together, so every train file counts."""
    train = {example.file for example in task.splits.get("train", [])}
    validation = {example.file for example in task.splits.get("validation", [])}
    return train if train & validation else set()


def _digest(rows: list[Example], prefix: int = -1) -> tuple[str, str | None]:
    """The sha256 of the rows, and that of their first `prefix` rows."""
    digest, head = hashlib.sha256(), None
    for i, example in enumerate(rows):
        if i == prefix:
            head = digest.hexdigest()
        digest.update(json.dumps([example.texts, example.label, example.instruction]).encode() + b"\n")
    if prefix == len(rows):
        head = digest.hexdigest()
    return digest.hexdigest(), head


def match_resumed_data(run_dir: Path, tasks: dict[str, TaskData]) -> bool:
    """Resume continues on the data the run started with: a task whose label vocabulary or rows changed is
    refused (its head would learn other classes, or the run mix two datasets); rows only appended to a file
    are a warning, and the tasks keep the run's target scaling. True when rows were added. Rows appended to
    a task whose validation split is carved from train are refused too: a carve of the longer file would move
    rows between train and validation, so the run would validate on rows it already trained on. A run from
    before data fingerprints is only checked for its labels."""
    path = run_dir / "tasks.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = {name: manifest[name] for name in tasks}
    except (OSError, ValueError, KeyError, TypeError):
        raise MultitunError("the run being resumed has no readable tasks.json for its tasks", file=str(path)) from None
    added, unchecked = False, []
    for name, task in tasks.items():
        saved = entries[name]
        if saved.get("labels") != task.labels:
            raise DataError(
                f"task '{name}': its labels changed since the run being resumed started "
                f"({_label_change(saved.get('labels') or [], task.labels or [])}): its head was trained on the old "
                "ones; start a new run or restore the data",
                file=split_source(task.config, "train"),
                field=label_field_name(task.config),
            )
        if task.config.type == "regression":  # the head learned targets scaled as at the start
            task.target_mean, task.target_std = float(saved["target_mean"]), float(saved["target_std"])
        fingerprint = saved.get("fingerprint")
        if not isinstance(fingerprint, dict):
            unchecked.append(name)
            continue
        carved = _carved_files(task)
        for file, rows in _rows_by_file(task).items():
            then = fingerprint.get(file)
            whole, head = _digest(rows, int(then["rows"]) if isinstance(then, dict) else -1)
            if isinstance(then, dict) and whole == then["sha256"]:
                continue
            if isinstance(then, dict) and head == then["sha256"] and file in carved:
                raise DataError(
                    f"task '{name}': {len(rows) - then['rows']} rows added since the run being resumed started, "
                    "but its validation split is carved from train: carving the longer file would move rows between "
                    "train and validation (validating on rows already trained on); start a new run, restore the "
                    "data, or give the task a validation source",
                    file=file,
                )
            if isinstance(then, dict) and head == then["sha256"]:
                added = True
                print(
                    f"warning: task '{name}': {len(rows) - then['rows']} rows added to {file} since the run "
                    "started; resuming with them (the run no longer repeats an uninterrupted one)",
                    file=sys.stderr,
                )
                continue
            count = f"{then['rows']} rows then, {len(rows)} now" if isinstance(then, dict) else "not read then"
            raise DataError(
                f"task '{name}': its rows changed since the run being resumed started ({count}): resuming would "
                "continue on other data; start a new run or restore the data",
                file=file,
            )
        gone = sorted(set(fingerprint) - set(_rows_by_file(task)))
        if gone:
            raise DataError(f"task '{name}': no rows are read from it any more", file=gone[0])
    if unchecked:
        print(
            f"note: {path} has no data fingerprints (a run from an older version): resuming without checking "
            f"that the rows of {', '.join(unchecked)} are unchanged",
            file=sys.stderr,
        )
    return added


def _label_change(old: list[str], new: list[str]) -> str:
    new_labels = [label for label in new if label not in old]
    gone = [label for label in old if label not in new]
    parts = [f"new: {', '.join(new_labels)}"] if new_labels else []
    parts += [f"gone: {', '.join(gone)}"] if gone else []
    return "; ".join(parts) or f"the same labels in another order: {', '.join(new)}"


def optimizer_for(model: MultiTaskModel, weighting: LossWeighting, config: Config) -> torch.optim.Optimizer:
    training = config.training
    return make_optimizer(model, weighting, training.lr, training.head_lr, training.weight_decay)


def make_optimizer(
    model: torch.nn.Module, weighting: LossWeighting, lr: float, head_lr: float | None, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms; heads (and learnable loss weights) may take their own rate.
    The backbone's parameters get groups of their own: sharded (FSDP) they cannot share a fused step with whole
    tensors, and keeping the groups the same sharded or not lets a sharded run resume on one process."""
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = 0.0 if parameter.ndim < 2 else weight_decay
        rate = head_lr if name.startswith("heads.") and head_lr else lr
        groups.setdefault((rate, decay, name.startswith("backbone.")), []).append(parameter)
    if isinstance(weighting, torch.nn.Module):  # learnable loss weights learn at the heads' rate
        learnable = [p for p in weighting.parameters() if p.requires_grad]
        if learnable:
            groups.setdefault((head_lr or lr, 0.0, False), []).extend(learnable)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd, _), ps in groups.items()]
    try:  # the fused kernel: on 2 CPU cores it takes the optimizer step of MiniLM from ~0.16 s to ~0.02 s
        return torch.optim.AdamW(param_groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups)


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


FINETUNED = "finetuned"


def record_finetune(run_dir: Path) -> Callable[[dict[str, Any]], None]:
    def record(entry: dict[str, Any]) -> None:
        with (run_dir / "history.jsonl").open("a", encoding="utf-8") as history:
            history.write(json.dumps({"stage": "finetune", **entry}) + "\n")

    return record


def finetune_per_task(
    config: Config, prepared: Prepared, accelerator: Any, run_dir: Path, record: Callable[[dict[str, Any]], None]
) -> tuple[dict[str, Any], float]:
    """The second stage of `two_stage` (as MT-DNN): from the multi-task weights, a copy fine-tuned on each
    task alone, best on its own validation score, saved to RUN_DIR/finetuned/TASK; returns the copies'
    test results and their training seconds. The multi-task weights are back in place afterwards."""
    from transformers import get_linear_schedule_with_warmup

    model = prepared.model
    schedule, training = config.training.schedule, config.training
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results: dict[str, Any] = {}
    seconds = 0.0
    for name, task in prepared.tasks.items():
        model.load_state_dict(start)
        folder = run_dir / FINETUNED / name
        stage = config.model_copy(deep=True)
        stage.training.lr = schedule.finetune_lr or training.lr
        balancer = build_balancer(stage.model_copy(update={"gradient_aggregation": None}), [name])
        optimizer = optimizer_for(model, balancer.weighting, stage)
        warmup = int(training.warmup_ratio * schedule.finetune_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, schedule.finetune_steps)
        sampler = SAMPLERS.build("round_robin", injected={"sizes": {name: 1}})
        streams = {name: TaskStream(prepared.encoded[name]["train"], f"{config.run.seed}:{name}:finetune")}
        only = {name: task}

        def validate(step: int, only: dict[str, TaskData] = only, name: str = name) -> Validation:
            result = evaluate(
                model,
                only,
                prepared.scored,
                "validation",
                training.eval_batch_size,
                accelerator.device,
                prepared.pad_id,
                progress=training.progress,
            )[name]
            signed = result["main_score"] if result["higher_is_better"] else -result["main_score"]
            record({"task": name, "step": step, "validation": {name: result["metrics"]}})
            return Validation(signed, {name: result["main_score"]}, {name: signed})

        settings = LoopSettings(
            steps=schedule.finetune_steps,
            batch_size=training.batch_size,
            seed=config.run.seed,
            pad_id=prepared.pad_id,
            max_grad_norm=training.max_grad_norm,
            eval_every=min(training.eval_every, schedule.finetune_steps),
            log_every=training.log_every,
            max_nonfinite_steps=training.max_nonfinite_steps,
            progress=training.progress,
        )
        state = train(
            model,
            streams,
            sampler,
            balancer,
            optimizer,
            scheduler,
            accelerator,
            settings,
            TrainState(),
            validate,
            lambda step, folder=folder: save_weights(model, folder / WEIGHTS_FILE),  # type: ignore[misc]
            lambda s: None,
            lambda entry, name=name: record({"task": name, **entry}),  # type: ignore[misc]
        )
        seconds += state.seconds
        load_weights(model, folder / WEIGHTS_FILE)
        results.update(
            evaluate(
                model,
                only,
                prepared.scored,
                "test",
                training.eval_batch_size,
                accelerator.device,
                prepared.pad_id,
                progress=training.progress,
            )
        )
    model.load_state_dict(start)
    return results, seconds


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


def guard_baselines(config: Config) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """Single-task main scores for the guard, and their trajectories by rows seen where a comparison.json
    recorded them; signed like validation scores (negated where lower is better)."""
    settings = config.guard
    baselines = dict(settings.baselines or {})
    trajectories: dict[str, list[tuple[int, float]]] = {}
    if settings.baselines_from:
        path = Path(settings.baselines_from)
        try:
            compared = json.loads(path.read_text(encoding="utf-8"))["tasks"]
            for name, entry in compared.items():
                sign = 1.0 if entry.get("higher_is_better", True) else -1.0
                baselines.setdefault(name, sign * entry["single"])
                points = [(int(rows), sign * float(score)) for rows, score in entry.get("single_trajectory") or []]
                if points and name not in (settings.baselines or {}):
                    trajectories[name] = points
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError("not a readable comparison.json", file=str(path), field="guard.baselines_from") from None
    unknown = sorted(set(baselines) - set(config.tasks))
    if unknown:
        raise ConfigError(f"baselines for unknown tasks: {', '.join(unknown)}", field="guard.baselines")
    return baselines, trajectories


def build_guard(config: Config, names: list[str], balancer: Balancer) -> NegativeTransferGuard | None:
    settings = config.guard
    if not settings.enabled:
        return None
    baselines, trajectories = guard_baselines(config)
    guard = NegativeTransferGuard(
        names,
        settings.action,
        settings.patience,
        settings.min_gain,
        settings.factor,
        baselines,
        trajectories,
        start_step=int(settings.start * config.training.steps),
    )
    balancer.task_scale = guard.scale  # the guard's multipliers are what balanced_backward applies
    return guard


def probe_batches(prepared: Prepared, config: Config, split: str = "train") -> dict[str, Batch]:
    """A fixed, seeded batch of one split's rows per task, on which task relations are measured."""
    out = {}
    for name in prepared.tasks:
        rows = prepared.encoded[name][split]
        picks = random.Random(f"{config.run.seed}:{name}:probe:{split}").sample(
            range(len(rows)), min(len(rows), config.training.batch_size)
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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory of this process, or on the CPU its peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class TrainingParts:
    """The stateful pieces of a run, saved into and restored from a checkpoint together."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    sampler: TaskSampler
    balancer: Balancer
    streams: dict[str, TaskStream[Encoded]]
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

    def save_weights(self, path: Path, group: Processes) -> None:
        """The model's weights, written by the main process."""
        if group.main or self.sharded:
            weights = self._weights()
            if group.main:
                save_weights(weights, path)

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


def resume_run(run_dir: str | Path) -> Path:
    """`multitune resume RUN_DIR`: the saved config, continued from the newest loadable checkpoint."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise MultitunError("not a multitune run: config.yaml is missing", file=str(run))
    settings = {"resume": str(run), "output_dir": str(run.parent), "name": run.name}
    return train_run(load_run_config(run / "config.yaml", settings))


# --- using a finished run -----------------------------------------------------------------------


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, Any], MultiTaskModel, Backbone]:
    """A finished run's config, tasks.json and model. Every file is checked as it is read: a damaged one is a
    one-line MultitunError naming it (and the task and field), never a traceback."""
    run = Path(run_dir)
    for required in ("config.yaml", "tasks.json", WEIGHTS_FILE, "backbone"):
        if not (run / required).exists():
            raise MultitunError(f"not a finished multitune run: {required} is missing", file=str(run))
    config = load_run_config(run / "config.yaml")
    manifest = read_manifest(run / "tasks.json", config.tasks)
    backbone = rebuilt_backbone(run / "backbone", config.model.kind)
    tasks = {name: task_from_manifest(name, config.tasks[name], manifest[name]) for name in config.tasks}
    model = build_model(config, tasks, backbone)
    try:
        load_weights(model, run / WEIGHTS_FILE)
    except RuntimeError as error:  # a tensor of another shape: a head sized by other labels than tasks.json's
        first = str(error).strip().splitlines()
        raise MultitunError(
            f"the weights do not fit the model that config.yaml and tasks.json describe: {first[-1] if first else ''}",
            file=str(run / WEIGHTS_FILE),
        ) from None
    model.eval()
    return config, manifest, model, backbone


def read_json_file(path: Path) -> Any:
    """A JSON file of a run, or a one-line MultitunError naming it (and the line where its JSON breaks)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MultitunError(
            f"not valid JSON (damaged?): {error.msg}, column {error.colno}", file=str(path), line=error.lineno
        ) from None
    except UnicodeDecodeError:
        raise MultitunError("not UTF-8 text (damaged?)", file=str(path)) from None
    except RecursionError:
        raise MultitunError("not a JSON file multitune wrote: nested too deeply", file=str(path)) from None
    except OSError as error:
        raise MultitunError(f"cannot be read: {error.strerror or error}", file=str(path)) from None


def read_manifest(path: Path, tasks: dict[str, TaskConfig]) -> dict[str, dict[str, Any]]:
    """tasks.json, checked against the run's config: an entry per task, with the type, labels and target
    scaling the heads were trained with. What a head's size and answers rest on is checked here, where the
    file can be named, not where a damaged value would first be used."""
    manifest = read_json_file(path)
    if not isinstance(manifest, dict):
        raise MultitunError(f"holds {_json_kind(manifest)}, not an object of tasks (damaged?)", file=str(path))
    for name, task in tasks.items():
        if name not in manifest:
            raise MultitunError(
                f"no entry for task '{name}' of config.yaml (damaged?; it holds "
                f"{', '.join(_shown(key) for key in list(manifest)[:8]) or 'none'})",
                file=str(path),
            )
        entry = manifest[name]
        if not isinstance(entry, dict):
            raise MultitunError(
                f"task '{name}': its entry is {_json_kind(entry)}, not an object", file=str(path), field=name
            )
        problem = _manifest_problem(entry, task)
        if problem is not None:
            key, message = problem
            raise MultitunError(f"task '{name}': {message} (damaged?)", file=str(path), field=f"{name}.{key}")
    return manifest


def _manifest_problem(entry: dict[str, Any], task: TaskConfig) -> tuple[str, str] | None:
    """(field, what is wrong) with one task's tasks.json entry, or None."""
    if entry.get("type") != task.type:
        return "type", f"its type is {entry.get('type')!r}, but config.yaml says '{task.type}'"
    labels = entry.get("labels")
    if task.type in ("regression", "generation"):
        if labels is not None:
            return "labels", f"a {task.type} task has no labels, found {_json_kind(labels)}"
    else:
        fewest = 1 if task.type == "token_classification" else 2
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            return "labels", f"must be a list of label names, found {_json_kind(labels)}"
        if len(set(labels)) != len(labels) or len(labels) < fewest:
            return (
                "labels",
                f"must name at least {fewest} distinct labels, found {len(labels)} ({len(set(labels))} distinct)",
            )
        if task.labels is not None and labels != task.labels:
            return "labels", f"{labels} differ from the labels config.yaml gives"
    for key in ("target_mean", "target_std"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return key, f"must be a finite number, found {_json_kind(value) if not isinstance(value, float) else value}"
    if entry["target_std"] <= 0:
        return "target_std", f"must be above 0, found {entry['target_std']}"
    rows = entry.get("rows", {})  # the model card lists them
    if not isinstance(rows, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in rows.values()):
        return "rows", f"must be an object of row counts per split, found {_json_kind(rows)}"
    return None


def rebuilt_backbone(folder: Path, kind: str) -> Backbone:
    """The run's saved backbone (architecture and tokenizer). Its JSON files are checked first, so a damaged
    one is named; whatever else transformers or tokenizers cannot read is one line naming the folder."""
    for path in sorted(folder.glob("*.json")):
        if not isinstance(read_json_file(path), dict):
            raise MultitunError("not a JSON object as transformers writes (damaged?)", file=str(path))
    try:
        return FROM_RUN.get(kind, backbone_from_run)(folder)
    except MultitunError:
        raise
    except Exception as error:  # transformers and tokenizers raise many types; all mean "cannot rebuild it"
        first = str(error).strip().splitlines()
        raise MultitunError(
            f"the saved backbone cannot be rebuilt (damaged?): {type(error).__name__}: {first[0] if first else ''}",
            file=str(folder),
        ) from None


def task_from_manifest(name: str, config: TaskConfig, entry: dict[str, Any]) -> TaskData:
    return TaskData(name, config, {}, entry["labels"], entry["target_mean"], entry["target_std"])


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    config, manifest, model, backbone = load_run(run_dir)
    tasks = load_tasks(config.tasks, config.run.seed, config.model.trust_remote_code)
    for name, task in tasks.items():  # the labels the heads were trained with, not those re-inferred
        saved = task_from_manifest(name, task.config, manifest[name])
        task.labels, task.target_mean, task.target_std = saved.labels, saved.target_mean, saved.target_std
        known = set(task.labels or [])
        for example in task.splits.get(split, task.splits["validation"]):
            for label in example.label if isinstance(example.label, tuple) else (example.label,):
                if task.labels is not None and str(label) not in known:
                    raise example.error(
                        f"unknown label '{label}' for task '{name}' as trained", label_field_name(task.config)
                    )
    encoded = encode_splits(tasks, backbone.tokenizer, config.model.max_length, config.model.kind == "seq2seq")
    scored = scoring_rows(tasks, encoded, backbone.tokenizer, config.model.max_length)
    device = torch.device("cpu")
    pad = backbone.tokenizer.pad_token_id or 0
    finetuned = Path(run_dir) / FINETUNED
    size, show = config.training.eval_batch_size, config.training.progress
    if finetuned.is_dir():  # a two-stage run: each task is answered by its own fine-tuned copy
        results = {}
        for name in tasks:
            load_weights(model, finetuned / name / WEIGHTS_FILE)
            results.update(evaluate(model, {name: tasks[name]}, scored, split, size, device, pad, progress=show))
    else:
        results = evaluate(model, tasks, scored, split, size, device, pad, progress=show)
    average = average_main_score(results)
    out = {"tasks": results, "average_main_score": average}
    write_json(Path(run_dir) / f"evaluation_{split}.json", out)
    print(format_table(results, average))
    return out


# --- prediction inputs: one schema per task, one validator, shared by `multitune predict` and the server ---

GENERIC_TEXT_FIELDS = ("text", "text_pair")
JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}


@dataclass(frozen=True)
class InputSchema:
    """What a prediction record of one task holds, from the task's type and fields: its text(s) or its list of
    words, under the task's own field names or the generic ones (`text`, `text_pair`, `tokens`; a one-text
    generation task also `input`); a generation task's optional `instruction`; and the task's label field,
    which a record copied from the task's data may keep (not read; `multitune predict` passes it through).
    Anything else is refused: a misspelt or extra text would otherwise be silently left out."""

    task: str
    type: str
    spellings: tuple[tuple[str, ...], ...]  # the accepted names of the inputs, the task's own first
    generic: tuple[str, ...]  # the generic spelling among them
    words: bool  # token_classification: one list of words
    optional: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        return self.spellings[0]

    def describe(self) -> str:
        """The inputs in words, for error messages: `two texts, 'premise' and 'hypothesis' (or 'text' and
        'text_pair')`."""
        what = "a list of words" if self.words else "one text" if len(self.fields) == 1 else "two texts"
        names = [" and ".join(f"'{name}'" for name in spelling) for spelling in self.spellings]
        others = f" (or {' or '.join(names[1:])})" if len(names) > 1 else ""
        return f"{what}, {names[0]}{others}"

    def json_schema(self) -> dict[str, Any]:
        """The record as a JSON schema, for /v1/tasks and the OpenAPI document."""
        text = {"type": "string", "minLength": 1, "pattern": "\\S", "description": "not blank"}
        value = {"type": "array", "items": text, "minItems": 1} if self.words else text
        extra: dict[str, Any] = {name: {"type": ["string", "null"]} for name in self.optional}
        extra.update({name: {"description": "the label, if the record has one: not read"} for name in self.ignored})
        variants = [
            {
                "type": "object",
                "properties": {**{name: value for name in spelling}, **extra},
                "required": list(spelling),
                "additionalProperties": False,
            }
            for spelling in self.spellings
        ]
        described = {"title": f"{self.task} input", "description": f"a {self.type} input: {self.describe()}"}
        return {**described, **(variants[0] if len(variants) == 1 else {"anyOf": variants})}


def input_schema(name: str, task: TaskConfig) -> InputSchema:
    """The one definition of a task's prediction input (see InputSchema)."""
    own = list(task.text_fields or [])
    if task.type == "token_classification":
        generic: tuple[str, ...] = ("tokens",)
    else:
        generic = GENERIC_TEXT_FIELDS[: len(own)]
    named = tuple(f for f in own if isinstance(f, str))
    spellings = [named] if len(named) == len(own) else []
    spellings.append(generic)
    if task.type == "generation" and len(own) == 1:
        spellings.append(("input",))  # as a unified record names it
    unique = tuple(dict.fromkeys(spellings))
    taken = {f for spelling in unique for f in spelling}
    optional = ("instruction",) if task.type == "generation" and "instruction" not in taken else ()
    labels = ["output", "task"] if task.source.format == "unified" else []
    if isinstance(task.label_field, str):
        labels.insert(0, task.label_field)
    ignored = tuple(f for f in dict.fromkeys(labels) if f not in taken and f not in optional)
    return InputSchema(name, task.type, unique, generic, task.type == "token_classification", optional, ignored)


def checked_input(schema: InputSchema, row: Row) -> tuple[tuple[str, ...], str | None]:
    """A prediction record's texts (or words) and instruction, by `schema`; anything else raises a DataError
    naming the record's place and field. The one check of `multitune predict` and of `multitune serve`."""
    values = row.values
    if not isinstance(values, dict):
        raise row.error(f"expected a JSON object, not {_json_kind(values)}")
    complete = [spelling for spelling in schema.spellings if all(f in values for f in spelling)]
    chosen = (
        complete[0]
        if complete
        else max(schema.spellings, key=lambda spelling: sum(f in values for f in spelling))  # the first of ties
    )
    for name in chosen:
        if name not in values:
            raise row.error(f"missing: task '{schema.task}' takes {schema.describe()}{_found(values)}", name)
    for name in values:
        if name not in chosen and name not in schema.optional and name not in schema.ignored:
            also = "".join(f"; '{f}' may be given too" for f in schema.optional)
            also += "".join(f"; '{f}' may be given (the label: not read)" for f in schema.ignored)
            raise row.error(
                f"not an input of task '{schema.task}', which takes {schema.describe()}{also}; "
                "a record with other fields is refused",
                _shown(name),
            )
    if schema.words:
        texts = _checked_words(row, values[chosen[0]], chosen[0])
    else:
        texts = tuple(_checked_text(row, values[name], name) for name in chosen)
    instruction = values.get("instruction") if "instruction" in schema.optional else None
    if instruction is not None and not isinstance(instruction, str):
        raise row.error(f"expected text or null, not {_json_kind(instruction)}", "instruction")
    return texts, instruction if instruction and instruction.strip() else None


def _checked_text(row: Row, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise row.error(f"expected text, not {_json_kind(value)}", name)
    if not value.strip():
        raise row.error("empty text" if not value else "blank text (only white space)", name)
    return value


def _checked_words(row: Row, value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        hint = " (split the sentence into its words)" if isinstance(value, str) else ""
        raise row.error(f"expected a list of words, not {_json_kind(value)}{hint}", name)
    if not value:
        raise row.error("empty list of words", name)
    for i, word in enumerate(value):
        if not isinstance(word, str):
            raise row.error(f"word {i}: expected text, not {_json_kind(word)}", name)
        if not word.strip():
            raise row.error(f"word {i}: {'empty' if not word else 'blank (only white space)'}", name)
    return tuple(value)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    return JSON_KINDS.get(type(value), type(value).__name__)


def _shown(name: str) -> str:
    """A record's own key as an error names it: on one line and short (escaped and cut when it is not)."""
    if name.isprintable() and 0 < len(name) <= 40:
        return name
    return repr(name if len(name) <= 40 else name[:37] + "...")[1:-1] or '""'


def _found(values: dict[str, Any]) -> str:
    shown = [repr(name if len(name) <= 40 else name[:37] + "...") for name in list(values)[:8]]
    more = f" and {len(values) - 8} more" if len(values) > 8 else ""
    return f" (the record has {', '.join(shown)}{more})" if shown else " (the record is empty)"


def example_for_prediction(row: Row, schema: InputSchema, task: TaskConfig) -> Example:
    """A checked prediction record as an example without a label; a generation record's own instruction
    wins over the task's."""
    texts, instruction = checked_input(schema, row)
    if task.type == "generation":
        return Example(texts, None, row.file, row.line, instruction or task.instruction)
    return Example(texts, None, row.file, row.line)


def encode_for_prediction(
    config: Config, task: TaskData, tokenizer: Any, rows: Sequence[Row]
) -> Sequence[PredictionRow]:
    """Prediction inputs (records naming the task's fields) tokenized as `predict` takes them; `multitune
    predict` and `multitune serve` share this path, so they accept, refuse and answer alike."""
    schema = input_schema(task.name, task.config)
    examples = [example_for_prediction(row, schema, task.config) for row in rows]
    if task.config.type == "token_classification":  # a record longer than max_length: tagged by windows
        return encode_for_tagging(examples, task, tokenizer, config.model.max_length)
    return encode(examples, task, tokenizer, config.model.max_length, False, config.model.kind == "seq2seq")


def prediction_bounds(task: TaskData, entry: dict[str, Any]) -> tuple[float, float] | None:
    """A regression task's range of training targets from its tasks.json entry; None for other tasks and for
    runs from before the range was recorded (their predictions are not held to it)."""
    low, high = entry.get("target_min"), entry.get("target_max")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if task.config.type != "regression" or not numbers or not low <= high:  # type: ignore[operator]
        return None
    return float(low), float(high)  # type: ignore[arg-type]


def held_to_range(result: dict[str, Any], bounds: tuple[float, float] | None) -> dict[str, Any]:
    """A regression prediction clamped to the range of the training targets (a 0-5 similarity no longer
    answers -0.2); `raw` keeps the model's own value. Evaluation scores the raw values."""
    if bounds is None:
        return result
    raw = result["prediction"]
    return {**result, "prediction": min(max(raw, bounds[0]), bounds[1]), "raw": raw}


def predict_run(run_dir: str | Path, task_name: str, source: TextIO, name: str = "<stdin>") -> list[dict[str, Any]]:
    """Each input record with its prediction added; all inputs are checked before anything is returned."""
    config, manifest, model, backbone = load_run(run_dir)
    if task_name not in config.tasks:
        raise ConfigError(f"no task '{task_name}' in this run (tasks: {', '.join(config.tasks)})", field="--task")
    task = task_from_manifest(task_name, config.tasks[task_name], manifest[task_name])
    own = Path(run_dir) / FINETUNED / task_name / WEIGHTS_FILE
    if own.exists():  # a two-stage run: this task's fine-tuned copy
        load_weights(model, own)
    rows = list(_rows(source, name))
    encoded = encode_for_prediction(config, task, backbone.tokenizer, rows)
    pad = backbone.tokenizer.pad_token_id or 0
    label = f"predict {task_name}" if config.training.progress else None
    results = predict(model, task, encoded, config.training.eval_batch_size, torch.device("cpu"), pad, label)
    bounds = prediction_bounds(task, manifest[task_name])
    return [
        {**row.values, **held_to_range(result, bounds)}  # type: ignore[dict-item]
        for row, result in zip(rows, results, strict=True)
    ]


def _rows(source: TextIO, name: str) -> Iterator[Row]:
    if name != "<stdin>":
        return read_jsonl(name)
    return json_rows(enumerate(source, start=1), name)


def describe_methods() -> Iterable[dict[str, str]]:
    """Every registered method with its summary, paper, gradient sources and cost (from the classes)."""
    from multitune.evaluation.metrics import METRICS

    registries = (
        ("sampler", SAMPLERS),
        ("loss weighting", LOSS_WEIGHTINGS),
        ("gradient aggregator", GRADIENT_AGGREGATORS),
        ("architecture", ARCHITECTURES),
        ("head", HEADS),
        ("metric", METRICS),
    )
    for kind, registry in registries:
        for name, summary in registry.summaries():
            factory = registry.get(name)
            yield {
                "kind": kind,
                "name": name,
                "summary": summary,
                "paper": getattr(factory, "paper", ""),
                "sources": ", ".join(getattr(factory, "sources", ())),
                "cost": getattr(factory, "cost", ""),
            }


def methods_markdown() -> str:
    """The README's methods table, generated from the registries."""
    lines = [
        "| kind | config name | what it does | paper | gradient source | extra cost |",
        "|---|---|---|---|---|---|",
    ]
    for m in describe_methods():
        cells = [m["kind"], f"`{m['name']}`", m["summary"], m["paper"], m["sources"], m["cost"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
