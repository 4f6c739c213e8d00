"""Typed config groups; `load_config(path, overrides)` turns YAML plus `key.sub=value` overrides into a Config.

Every group forbids unknown keys; an error names the key, the file and, where the YAML has it, the line.
Method groups (`sampling`, `loss_weighting`) take a registry name plus that method's own parameters.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from multitune.errors import ConfigError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PACKAGE_PREFIX = "multitune:"
SPLITS = ("train", "validation", "test")

TaskType = Literal["classification", "pair_classification", "regression", "token_classification", "generation"]
DataFormat = Literal["jsonl", "csv", "tsv", "conll", "hf", "unified", "parallel"]
# what the backbone is: an encoder with task heads, or a causal or encoder-decoder (seq2seq) LM that also
# generates (models/causal_lm.py); "auto": causal_lm when any task is a generation task, else encoder
ModelKind = Literal["auto", "encoder", "causal_lm", "seq2seq"]


def _check_name(value: str, what: str) -> str:
    if not NAME_PATTERN.match(value) or value in (".", ".."):
        raise ValueError(f"{what} '{value}' must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric")
    return value


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Group):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = Field(13, ge=0, lt=2**32)  # numpy's seeds are 32-bit and non-negative
    resume: str | None = None  # "auto": continue output_dir/name from its newest checkpoint; or a run dir

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "run name")


class MethodConfig(BaseModel):
    """A registry name plus that method's parameters, e.g. `{name: temperature, temperature: 2.0}`."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AdapterConfig(Group):
    """Per-task parameter-efficient adapters on a frozen backbone (models/peft_tasks.py)."""

    method: Literal["lora", "prompt", "bottleneck"] = "lora"
    r: int = Field(8, ge=1)  # LoRA rank
    alpha: int = Field(16, ge=1)  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # LoRA: module names to adapt (default: peft's for the model type)
    shared: bool = False  # also one adapter that every task trains
    train_backbone: bool = False  # also fine-tune the backbone's own weights
    bottleneck_size: int = Field(64, ge=1)
    virtual_tokens: int = Field(20, ge=1)  # prompt: learned input vectors per task


class ModelConfig(Group):
    backbone: str = "sentence-transformers/all-MiniLM-L6-v2"
    revision: str | None = None
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(128, ge=8, le=8192)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    random_init: bool = False  # build the backbone from its config with random weights (speed tests)
    trust_remote_code: bool = False
    kind: ModelKind = "auto"
    init_from: str | None = None  # a finished run whose backbone weights this run starts from
    # how tasks share the backbone: hard, hybrid, soft, cross_stitch, mmoe, ple (models/architectures.py)
    architecture: MethodConfig = Field(default_factory=lambda: MethodConfig(name="hard"))
    peft: AdapterConfig | None = None  # one adapter per task (and optionally a shared one)
    # the backbone's attention kernel (transformers' names); default: the model's own choice (usually sdpa)
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    lm_loss_chunk: int = Field(4096, ge=0)  # causal LMs: target tokens per chunk of the fused LM-head loss; 0: off


class GradientConfig(MethodConfig):
    """A gradient aggregator, e.g. `{name: pcgrad, source: representation}`; see balancing/backward.py."""

    source: Literal["representation", "parameters"] = "representation"
    buffer_dtype: Literal["float32", "bfloat16"] = "float32"  # the [T, P] buffer of the parameters source


class EarlyStoppingConfig(Group):
    """Stop when validation stops improving: the whole run on the average main score, or (per_task) each
    task on its own main score (a stopped task is no longer sampled; the run ends when all have stopped)."""

    patience: int = Field(3, ge=1)  # validations without improvement
    min_delta: float = Field(0.0, ge=0)  # an improvement must exceed this
    per_task: bool = False


class ScheduleConfig(Group):
    """joint: every step draws from the sampler. sequential: tasks one after another (order, fractions).
    two_stage: joint training, then a copy of the model fine-tuned per task (MT-DNN). reptile: blocks of
    inner_steps steps on one task, each followed by the Reptile meta-update with step size meta_lr."""

    name: Literal["joint", "sequential", "two_stage", "reptile"] = "joint"
    order: list[str] | None = None  # sequential: the task order (default: the config's)
    fractions: list[float] | None = None  # sequential: each stage's share of the steps (default: equal)
    finetune_steps: int = Field(200, ge=1)  # two_stage: steps of each per-task copy
    finetune_lr: float | None = Field(None, gt=0)  # two_stage: default training.lr
    inner_steps: int = Field(5, ge=1)  # reptile
    meta_lr: float = Field(0.5, gt=0, le=1)  # reptile: ε in θ ← θ + ε(θ' − θ)


class DeepSpeedConfig(Group):
    """DeepSpeed ZeRO on several processes (training/zero.py): stage 1 partitions the AdamW state, stage 2
    the gradients too; offload_optimizer: cpu keeps the partition in host memory."""

    stage: int = 2
    offload_optimizer: Literal["none", "cpu"] = "none"


class TrainingConfig(Group):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(200, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    mixed_batches: bool = False  # one batch mixes examples of several tasks, drawn by the sampler
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward: less memory
    fsdp: bool = False  # several processes: shard the backbone's weights, gradients, optimizer state (FSDP2)
    deepspeed: DeepSpeedConfig | None = None  # several processes: DeepSpeed ZeRO stage 1 or 2
    gradient_accumulation: int = Field(1, ge=1)  # split each step's batch into this many backbone passes
    group_by_length: bool = False  # draw each task's rows in length-grouped order: less padding per batch
    packing: bool = False  # causal LMs: pack generation examples into rows of pack_length, no padding between
    pack_length: int | None = Field(None, ge=8)  # default: model.max_length
    compile: bool = False  # torch.compile the backbone (dynamic shapes)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(500, ge=1)  # also at the end and on SIGTERM / SIGINT
    keep_checkpoints: int = Field(2, ge=1)
    max_nonfinite_steps: int = Field(5, ge=1)  # skipped updates in a row before the run stops
    tensorboard: bool = False  # also write the history as TensorBoard scalars to RUN_DIR/tensorboard
    progress: bool = True
    early_stopping: EarlyStoppingConfig | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class RegularizationConfig(Group):
    """L2-SP (Li et al. 2018): alpha/2·‖θ−θ⁰‖² on the pretrained weights, beta/2·‖θ‖² on new ones (heads)."""

    l2_sp_alpha: float = Field(0.0, ge=0)
    l2_sp_beta: float = Field(0.0, ge=0)


class AnalysisConfig(Group):
    """Task relations measured during training (see analysis/affinity.py)."""

    task_affinity: bool = False  # at every validation: gradient cosines and lookahead affinity
    lookahead_lr: float = Field(0.01, gt=0)  # step length of the lookahead along one task's gradient
    groups: int = Field(2, ge=1)  # how many groups to recommend


class GuardConfig(Group):
    """Negative-transfer guard (see analysis/guard.py); turning it on also measures task relations."""

    enabled: bool = False
    action: Literal["downweight", "drop"] = "downweight"
    patience: int = Field(2, ge=1)  # validations in a row before acting
    min_gain: float = 0.0  # a task gaining more than this on its best validation score is left alone
    factor: float = Field(0.5, gt=0, lt=1)  # downweight: loss multiplier per action
    start: float = Field(0.25, ge=0, lt=1)  # judge only validations after this fraction of the steps
    baselines: dict[str, float] | None = None  # single-task main scores per task
    baselines_from: str | None = None  # or a comparison.json written by `multitune compare`


class SourceConfig(Group):
    """Where a task's rows come from. Paths are relative to the config file; `multitune:` is the package."""

    format: DataFormat
    train: str | list[str] | None = None  # one file, or several read one after another
    validation: str | list[str] | None = None
    test: str | list[str] | None = None
    encoding: str = "utf-8-sig"  # utf-8 that also drops a byte-order mark
    # csv / tsv
    delimiter: str | None = None  # default: ',' for csv, tab for tsv
    quoting: Literal["minimal", "none", "all"] = "minimal"
    header: bool = True
    columns: list[str] | None = None  # names for a file without a header
    # conll
    token_column: int = 0
    tag_column: int = -1
    # hf: a hub id or a builder ("json", "csv", "parquet") with data_files
    dataset: str | None = None
    subset: str | None = None
    data_files: dict[str, str | list[str]] | None = None
    split_names: dict[str, str] = Field(default_factory=dict)  # our split -> the dataset's split
    # unified: records {"task", "instruction", "input", "output"}
    task_key: str | None = None  # the value of "task" routed here; default: the task's name
    # parallel: each split is [source_file, target_file], two line-aligned plain-text files (Moses style)

    @model_validator(mode="after")
    def _complete(self) -> SourceConfig:
        if self.format == "hf":
            if not self.dataset:
                raise ValueError("format 'hf' needs 'dataset' (a hub id, or a builder such as 'json' with data_files)")
        elif not self.train:
            raise ValueError(f"format '{self.format}' needs a 'train' file")
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError("delimiter must be one character")
        if self.format == "parallel":
            for split in SPLITS:
                files = getattr(self, split)
                if files is not None and not (isinstance(files, list) and len(files) == 2):
                    raise ValueError(f"format 'parallel' takes {split}: [source_file, target_file], got {files!r}")
        return self


class SplitRows(Group):
    train: int | None = Field(None, ge=1)
    validation: int | None = Field(None, ge=1)
    test: int | None = Field(None, ge=1)


CLASS_TASKS = ("classification", "pair_classification", "token_classification")

DEFAULT_METRICS: dict[str, list[str]] = {
    "classification": ["accuracy", "macro_f1"],
    "pair_classification": ["accuracy", "macro_f1"],
    "regression": ["pearson", "spearman"],
    "token_classification": ["entity_f1"],
    "generation": ["exact_match"],
}

DEFAULT_TEXT_FIELDS: dict[str, list[str | int]] = {
    "classification": ["text"],
    "pair_classification": ["text", "text_pair"],
    "regression": ["text"],
    "token_classification": ["tokens"],
    "generation": ["text"],
}


class TaskConfig(Group):
    type: TaskType
    source: SourceConfig
    text_fields: list[str | int] | None = None  # default by type; pair tasks name two
    label_field: str | int = "label"
    labels: list[str] | None = None  # given order; default: sorted labels seen in train
    positive_label: str | None = None  # for the `f1` metric
    tag_scheme: Literal["iob1", "iob2"] = "iob2"  # token tasks; IOB1 is normalised to IOB2
    metrics: list[str] | None = None  # default by type; the first is the main metric
    main_metric: str | None = None
    normalize_targets: bool = True  # regression: train on standardised targets
    sampling_weight: float = Field(1.0, gt=0)  # multiplies the sampler's probability
    loss_weight: float = Field(1.0, ge=0)  # used by the `static` loss weighting
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # this task's head dropout (default: model.dropout)
    max_rows: SplitRows = Field(default_factory=SplitRows)
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    shuffle_labels: bool = False  # a control task: training labels permuted (seeded); evaluation keeps the truth
    # generation tasks (data/generative.py): the prompt is instruction + "\n\n" + input, the target a text
    instruction: str | None = None  # the same instruction for every row (a unified record's own one wins)
    verbalizer: dict[str, str] | None = None  # raw label value -> target text, e.g. {"0": negative}
    target_format: str | None = None  # a number as target text, e.g. "{:.1f}" (3.8 -> "3.8")
    max_new_tokens: int = Field(32, ge=1, le=4096)  # greedy generation length at evaluation

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if labels is not None:
            if len(set(labels)) != len(labels):
                raise ValueError("a label is listed twice")
            kind = info.data.get("type")
            if kind in CLASS_TASKS and len(labels) < 2:  # one class: the head has nothing to tell apart
                raise ValueError(f"a {kind} task needs at least two labels, got {labels}")
        return labels

    @model_validator(mode="after")
    def _complete(self) -> TaskConfig:
        if self.text_fields is None:
            self.text_fields = list(DEFAULT_TEXT_FIELDS[self.type])
        want = 2 if self.type == "pair_classification" else (1, 2)
        n = len(self.text_fields)
        if (isinstance(want, int) and n != want) or (isinstance(want, tuple) and n not in want):
            raise ValueError(f"text_fields: a {self.type} task takes {want} field(s), got {n}")
        if self.type == "token_classification" and n != 1:
            raise ValueError("text_fields: a token_classification task takes one field (the token list)")
        if self.metrics is None:
            self.metrics = list(DEFAULT_METRICS[self.type])
        if not self.metrics:
            raise ValueError("metrics: name at least one metric")
        if self.main_metric is None:
            self.main_metric = self.metrics[0]
        elif self.main_metric not in self.metrics:
            raise ValueError(f"main_metric '{self.main_metric}' is not in metrics {self.metrics}")
        self._check_generation()
        return self

    def _check_generation(self) -> None:
        if self.type != "generation":
            for key in ("instruction", "verbalizer", "target_format"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only generation tasks take it (this task is {self.type})")
            if self.source.format == "parallel":
                raise ValueError("source format 'parallel' feeds generation tasks only")
            return
        if self.verbalizer is not None and self.target_format is not None:
            raise ValueError("verbalizer and target_format: give one, not both")
        if self.verbalizer is not None and not all(v.strip() for v in self.verbalizer.values()):
            raise ValueError("verbalizer: a target text is empty")
        if self.target_format is not None:
            try:
                self.target_format.format(1.5)
            except (ValueError, IndexError, KeyError) as error:
                raise ValueError(f"target_format '{self.target_format}' does not format a number: {error}") from None
        if self.source.format == "conll":
            raise ValueError("a generation task reads text sources (jsonl, csv, tsv, hf, unified, parallel), not conll")


class Config(Group):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sampling: MethodConfig = Field(default_factory=lambda: MethodConfig(name="temperature", temperature=2.0))
    loss_weighting: MethodConfig = Field(default_factory=lambda: MethodConfig(name="equal"))
    gradient_aggregation: GradientConfig | None = None
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    tasks: dict[str, TaskConfig]

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        if not tasks:
            raise ValueError("name at least one task")
        for name in tasks:
            _check_name(name, "task name")
        return tasks

    @model_validator(mode="after")
    def _kind(self) -> Config:
        generative = [name for name, task in self.tasks.items() if task.type == "generation"]
        if self.model.kind == "auto":
            self.model.kind = "causal_lm" if generative else "encoder"
        elif self.model.kind == "encoder" and generative:
            raise ValueError(f"model.kind: generation task '{generative[0]}' needs a causal_lm or seq2seq backbone")
        return self


# --- loading ------------------------------------------------------------------------------------


# Bounds on what one YAML text may expand to. Aliases make a small text stand for a huge tree (nine
# levels of nine aliases: 9^9 values from 342 bytes) or an infinite one (an alias inside its own anchor);
# PyYAML builds them as shared objects, but every reader that walks the tree pays for the expansion.
# A hand-written config is a few hundred values, a few levels deep.
MAX_CONFIG_BYTES = 256 * 1024  # several thousand lines; loads in well under a second
MAX_DEPTH = 64  # nesting levels, aliases expanded
MAX_VALUES = 100_000  # mappings, lists and scalars (keys aside), aliases expanded

if yaml.__with_libyaml__:  # libyaml's parser is about 8x faster; the composer stays Python's, for its depth check
    from yaml._yaml import CParser as _Parser

    class _LoaderBase(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        def __init__(self, text: str) -> None:
            _Parser.__init__(self, text)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml
    _LoaderBase = yaml.SafeLoader  # type: ignore[misc,assignment]


class _Loader(_LoaderBase):
    """PyYAML's safe loader whose composer refuses nesting beyond MAX_DEPTH (its recursion would overflow)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                event: Any = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# YAML 1.1 (PyYAML) reads `1e-3` as text: a float needs a dot there. YAML 1.2 and every user read it as a
# number; without this a method parameter `lr: 1e-3` reached its method as the text '1e-3'.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_yaml(
    text: str, file: str | None, prefix: tuple[str, ...] = (), with_lines: bool = True
) -> tuple[Any, dict[tuple[str, ...], int]]:
    """One YAML document as (data, each key path's 1-based line). A key given twice in one mapping, an alias
    inside its own anchor, or a tree beyond MAX_DEPTH / MAX_VALUES once aliases are expanded is a ConfigError
    naming `file`, the line (with_lines) and the key path under `prefix`; a syntax error is a yaml.YAMLError."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        lines = _inspect(loader, root, file, prefix, with_lines)
        return _unshared(loader.construct_document(root)), lines
    finally:
        loader.dispose()


def _inspect(
    loader: _Loader, root: yaml.Node, file: str | None, prefix: tuple[str, ...], with_lines: bool
) -> dict[tuple[str, ...], int]:
    """Measure the tree the node graph stands for against the bounds, refuse duplicate keys, and map key paths
    to lines. A node met again through an alias adds its known size and height without a second walk (keys
    under that alias take the alias's line); each scalar is constructed here, cached for construct_document,
    so a bad one names its line."""
    lines: dict[tuple[str, ...], int] = {}
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values in its tree, levels below it)
    open_nodes: set[int] = set()  # collections on the current path: meeting one again is a cycle
    total = 0

    def fail(message: str, node: yaml.Node, path: tuple[str, ...]) -> ConfigError:
        line = node.start_mark.line + 1 if with_lines else None
        return ConfigError(message, file=file, line=line, field=".".join(path) or None)

    def scalar(node: yaml.Node, path: tuple[str, ...]) -> Any:
        try:
            return loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as error:
            problem = getattr(error, "problem", None) or str(error)
            raise fail(f"cannot read {node.value!r}: {problem}", node, path) from None

    def visit(node: yaml.Node, path: tuple[str, ...], depth: int) -> tuple[int, int]:
        nonlocal total
        known = measured.get(id(node))
        if known is None:
            if id(node) in open_nodes:
                raise fail("an alias refers to a value that contains it", node, path)
            total += 1
            known = measure(node, path, depth)
            measured[id(node)] = known
        else:
            total += known[0]
        if total > MAX_VALUES:
            raise fail(f"more than {MAX_VALUES} values once aliases are expanded", node, path)
        if depth + known[1] > MAX_DEPTH:
            raise fail(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", node, path)
        return known

    def measure(node: yaml.Node, path: tuple[str, ...], depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise fail(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", node, path)
        if isinstance(node, yaml.ScalarNode):
            scalar(node, path)
            return 1, 0
        open_nodes.add(id(node))
        size, height = 1, 0
        children: list[tuple[yaml.Node, tuple[str, ...], int, int | None]] = []  # node, path, depth, key line
        if isinstance(node, yaml.SequenceNode):
            children = [
                (item, (*path, str(i)), depth + 1, item.start_mark.line + 1) for i, item in enumerate(node.value)
            ]
        elif isinstance(node, yaml.MappingNode):
            # `<<: *defaults` first: its keys at this level, then the explicit ones, which win
            children = [(source, path, depth, None) for source in check_keys(node, path)]
            children += [
                (value, (*path, str(key.value)), depth + 1, key.start_mark.line + 1)
                for key, value in node.value
                if key.tag != MERGE_TAG
            ]
        for child, child_path, child_depth, line in children:
            if line is not None:
                lines[child_path] = line
            child_size, child_height = visit(child, child_path, child_depth)
            size += child_size
            height = max(height, child_height + child_depth - depth)
        open_nodes.discard(id(node))
        return size, height

    def check_keys(node: yaml.MappingNode, path: tuple[str, ...]) -> list[yaml.Node]:
        """Refuse a key given twice; return the mappings merged in (`<<`), the earliest last."""
        seen: dict[Any, int] = {}
        merged: list[yaml.Node] = []
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise fail("a key must be a plain value, not a list or mapping", key, (*path, "?"))
            name = str(key.value)
            if key.tag == MERGE_TAG:
                identity: Any = MERGE_TAG
                merged.extend(reversed(value.value) if isinstance(value, yaml.SequenceNode) else [value])
            else:  # equal as Python keys (1 and 0x1, true and True): the later one would replace the earlier
                identity = scalar(key, (*path, name))
            try:
                first = seen.get(identity)
                seen.setdefault(identity, key.start_mark.line + 1)
            except TypeError:  # unhashable: the constructor refuses it
                first = None
            if first is not None:
                where = f" (first on line {first})" if with_lines else ""
                raise fail(f"key '{name}' is given twice{where}", key, (*path, name))
        return merged

    visit(root, prefix, 0)
    return {key[len(prefix) :]: line for key, line in lines.items()}


def _unshared(value: Any) -> Any:
    """A copy in which no dict or list appears twice: an override of one alias's key must not change the others."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.steps=100` -> (["training", "steps"], 100); the value is read as YAML (text that is not YAML
    stays text), under the same bounds as a config file."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    try:
        value = parse_yaml(raw, "override", tuple(key.split(".")), with_lines=False)[0] if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(path[: i + 1])}' is not a group", field=".".join(path))
        node = child
    node[path[-1]] = value


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML config file as (data, key lines); anything that is not a YAML mapping is a one-line ConfigError
    naming the file (and the line, where there is one)."""
    path = Path(path)
    file = str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("config file not found", file=file) from None
    except OSError as error:
        raise ConfigError(f"cannot read config: {error.strerror or error}", file=file) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config", file=file)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config: not UTF-8 text (byte {error.start})", file=file) from None
    try:
        data, lines = parse_yaml(text, file)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or getattr(error, "reason", None) or "not YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of groups (run, model, training, tasks, ...)", file=file)
    return data, lines


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    data, lines = read_config_file(path)
    overridden: dict[tuple[str, ...], str] = {}  # key path -> its value's repr
    for text_override in overrides:
        key_path, value = parse_override(text_override)
        key = tuple(key_path)
        if overridden.get(key) == repr(value):  # the same value again: nothing is lost
            continue
        for earlier in overridden:  # a later override would silently undo an earlier one
            if earlier[: len(key)] == key:
                dotted, first = ".".join(key), ".".join(earlier)
                raise ConfigError(
                    f"'{dotted}' is overridden twice, with different values"
                    if earlier == key
                    else f"'{dotted}' replaces the earlier override of '{first}': give the group first, then its keys",
                    file="override",
                    field=dotted,
                )
        apply_override(data, key_path, value)
        overridden[key] = repr(value)
    config = validate_config(data, file=str(path), lines=lines, overridden=set(overridden))
    resolve_paths(config, path.parent)
    return config


def load_run_config(path: str | Path, run_settings: dict[str, Any] | None = None) -> Config:
    """A run directory's saved config.yaml (resume, evaluate, predict, serve, export), with `run_settings`
    replacing keys of its run group; a file that is not a multitune config is a one-line ConfigError."""
    data, lines = read_config_file(path)
    if run_settings:
        group = data.setdefault("run", {})
        if not isinstance(group, dict):
            raise ConfigError("must be a group", file=str(path), line=lines.get(("run",)), field="run")
        group.update(run_settings)
    return validate_config(data, file=str(path), lines=lines)


def validate_config(
    data: dict[str, Any],
    file: str | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: set[tuple[str, ...]] = frozenset(),  # type: ignore[assignment]
) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = tuple(str(part) for part in first["loc"] if not str(part).startswith("function-"))
        loc = tuple(p for p in loc if p not in ("str", "int", "list[union[str,int]]"))
        key = ".".join(loc)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], known_keys(loc[:-1]), n=1) if loc else []
            message = f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        else:
            message = (
                f"{message} (got {first.get('input')!r})"
                if "input" in first and first["type"] != "value_error"
                else message
            )
            if first["type"] == "literal_error" and isinstance(first.get("input"), str):  # a misspelt choice
                choices = re.findall(r"'([^']*)'", str(first.get("ctx", {}).get("expected", "")))
                close = difflib.get_close_matches(first["input"], choices, n=1)
                message += f"; did you mean '{close[0]}'?" if close else ""
        source, line = _locate(loc, file, lines or {}, overridden)
        raise ConfigError(message, file=source, line=line, field=key or None) from None
    try:
        check_numbers(config.model_dump(), "")
        check_methods(config)
    except ConfigError as error:
        if error.file is None and error.field:
            error.file, error.line = _locate(tuple(error.field.split(".")), file, lines or {}, overridden)
        raise
    return config


def known_keys(path: tuple[str, ...]) -> list[str]:
    """The keys the group at `path` (e.g. ('tasks', 'sst2', 'source')) takes, from the schema; [] if unknown."""
    kind: Any = Config
    for part in path:
        kind = _group_of(kind)
        if kind is None:
            return []
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field_info = kind.model_fields.get(part)
            if field_info is None:
                return []
            kind = field_info.annotation
        elif typing.get_origin(kind) is dict:  # a dict of groups (tasks): any key, the value's type
            kind = typing.get_args(kind)[1]
        else:
            return []
    kind = _group_of(kind)
    return list(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else []


def _group_of(kind: Any) -> Any:
    """`X | None` -> X: the group behind an optional setting."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind


FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the weights' dtype (bf16 shares its range)
INT64_MAX = 2**63 - 1  # torch's and numpy's widest integers


def check_numbers(value: Any, field: str) -> None:
    """Every number in a setting (method parameters too) is usable: a float is finite and within float32's
    range (the weights and losses it scales are float32, where a larger one is inf), an integer within int64.
    An inf learning rate would skip every update and still exit 0."""
    stack: list[tuple[str, Any]] = [(field, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, float) and not (math.isfinite(item) and abs(item) <= FLOAT32_MAX):
            raise ConfigError(f"must be a finite number within float32's range (±3.4e38), got {item!r}", field=path)
        if isinstance(item, int) and abs(item) > INT64_MAX:
            raise ConfigError(
                f"must be an integer within int64's range, got one of {len(str(abs(item)))} digits", field=path
            )
        children = (
            item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, (list, tuple)) else ()
        )
        stack.extend(reversed([(f"{path}.{key}" if path else str(key), child) for key, child in children]))


def _locate(
    key: tuple[str, ...], file: str | None, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]
) -> tuple[str | None, int | None]:
    """Where a key's value came from: (the config file, the line of its nearest written key) or ("override", None)."""
    if any(key[: len(o)] == o for o in overridden):
        return "override", None
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return file, lines[key[:n]]
    if any(o[: len(key)] == key for o in overridden):  # a group the file never wrote, set by overrides
        return "override", None
    return file, None


def check_speed_options(config: Config) -> None:
    """Packing and gradient accumulation: where they apply."""
    training = config.training
    if training.packing:
        not_generation = [name for name, task in config.tasks.items() if task.type != "generation"]
        if config.model.kind != "causal_lm" or not_generation:
            raise ConfigError(
                "packing puts several generation examples in one row of a causal LM; "
                + (
                    f"task '{not_generation[0]}' is a {config.tasks[not_generation[0]].type} task"
                    if not_generation
                    else f"this model is a {config.model.kind}"
                ),
                field="training.packing",
            )
        if config.model.peft is not None and not config.model.peft.shared:
            raise ConfigError(
                "per-task adapters route whole rows to one task; a packed row holds several tasks' examples",
                field="training.packing",
            )
        if training.pack_length is not None and training.pack_length < config.model.max_length:
            raise ConfigError(
                f"pack_length {training.pack_length} is shorter than model.max_length {config.model.max_length}",
                field="training.pack_length",
            )
    if training.gradient_accumulation > training.batch_size:
        raise ConfigError(
            f"gradient_accumulation {training.gradient_accumulation} splits a batch of {training.batch_size} rows "
            "into more parts than it has rows",
            field="training.gradient_accumulation",
        )
    gradient = config.gradient_aggregation
    if training.gradient_accumulation > 1 and gradient is not None and gradient.source == "parameters":
        raise ConfigError(
            "gradient accumulation splits the shared representation's backward; with the parameters source use "
            "a smaller batch, several processes, or the representation source",
            field="training.gradient_accumulation",
        )


def check_methods(config: Config) -> None:
    """Method names and parameters exist in their registries (imported here to keep config.py the root)."""
    from multitune.data.samplers import SAMPLERS
    from multitune.evaluation.metrics import METRICS
    from multitune.models.architectures import ARCHITECTURE_INJECTED, ARCHITECTURES

    architecture = config.model.architecture
    ARCHITECTURES.get(architecture.name, field="model.architecture.name")
    ARCHITECTURES.check_params(
        architecture.name, architecture.params, ARCHITECTURE_INJECTED, field="model.architecture"
    )
    if config.model.kind in ("causal_lm", "seq2seq") and architecture.name != "hard":
        raise ConfigError(
            f"a {config.model.kind} LM (or any generation task) is shared by hard sharing only",
            field="model.architecture.name",
        )
    gradient_source = config.gradient_aggregation.source if config.gradient_aggregation else None
    if architecture.name == "soft" and gradient_source == "parameters":
        raise ConfigError(
            "soft sharing shares no parameters: gradient aggregation needs source 'representation'",
            field="gradient_aggregation.source",
        )
    generative_lm = config.model.kind in ("causal_lm", "seq2seq")
    method = config.model.peft.method if config.model.peft is not None else None
    if (generative_lm and method == "prompt") or (config.model.kind == "seq2seq" and method == "bottleneck"):
        raise ConfigError(
            f"per-task {method} adapters are not available for a {config.model.kind} LM; use lora",
            field="model.peft.method",
        )
    if config.model.peft is not None and architecture.name in ("soft", "cross_stitch"):
        raise ConfigError(
            f"per-task adapters already give every task its own weights; use them with hard, hybrid, mmoe or ple, "
            f"not {architecture.name}",
            field="model.peft",
        )
    if architecture.name == "soft" and (config.analysis.task_affinity or config.guard.enabled):
        raise ConfigError(
            "task affinity is measured on shared parameters, and soft sharing has none",
            field="analysis.task_affinity" if config.analysis.task_affinity else "guard.enabled",
        )
    check_speed_options(config)
    schedule = config.training.schedule
    if schedule.name == "sequential":
        try:  # checks order and fractions now, not after the data is read
            SAMPLERS.build(
                "sequential",
                injected={"sizes": dict.fromkeys(config.tasks, 1), "total_steps": config.training.steps},
                order=schedule.order,
                fractions=schedule.fractions,
            )
        except ConfigError as error:
            raise ConfigError(error.message, field="training.schedule") from None
    if schedule.name in ("sequential", "reptile") and (
        config.training.mixed_batches or config.gradient_aggregation is not None
    ):
        raise ConfigError(
            f"the {schedule.name} schedule trains one task at a time: no mixed_batches, no gradient_aggregation",
            field="training.schedule.name",
        )
    check_balancing(
        config.sampling,
        config.loss_weighting,
        config.gradient_aggregation,
        list(config.tasks),
        config.training.mixed_batches,
        config.training.mixed_precision,
        config.training.steps,
    )
    for name, task in config.tasks.items():
        for metric in task.metrics or []:
            METRICS.get(metric, field=f"tasks.{name}.metrics")
            if metric == "f1" and task.positive_label is None:
                raise ConfigError("metric 'f1' needs positive_label", field=f"tasks.{name}.positive_label")


def check_balancing(
    sampling: MethodConfig,
    loss_weighting: MethodConfig,
    gradient: GradientConfig | None,
    task_names: list[str],
    mixed_batches: bool,
    mixed_precision: str = "no",
    total_steps: int = 1,
) -> None:
    """The sampler, loss weighting and gradient aggregator exist, accept their parameters' values, and fit
    together (shared by the config check and the Python API, api.py). Each is built once here on stand-in
    task sizes, so a bad value fails before any data is read, naming its config group."""
    from multitune.balancing.gradients import AGGREGATOR_INJECTED, GRADIENT_AGGREGATORS
    from multitune.balancing.losses import LOSS_WEIGHTINGS, WEIGHTING_INJECTED
    from multitune.data.samplers import SAMPLER_INJECTED, SAMPLERS

    tasks = len(task_names)
    for field, method in (
        ("sampling", sampling),
        ("loss_weighting", loss_weighting),
        ("gradient_aggregation", gradient),
    ):
        if method is not None:
            check_numbers(method.params, field)
    SAMPLERS.get(sampling.name, field="sampling.name")
    SAMPLERS.check_params(sampling.name, sampling.params, SAMPLER_INJECTED, field="sampling")
    stand_in = {"sizes": dict.fromkeys(task_names, 1), "weights": dict.fromkeys(task_names, 1.0)}
    SAMPLERS.build(
        sampling.name, injected={**stand_in, "total_steps": total_steps}, field="sampling", **sampling.params
    )
    LOSS_WEIGHTINGS.get(loss_weighting.name, field="loss_weighting.name")
    LOSS_WEIGHTINGS.check_params(loss_weighting.name, loss_weighting.params, WEIGHTING_INJECTED, field="loss_weighting")
    named = {"task_names": list(task_names), "seed": 0}
    LOSS_WEIGHTINGS.build(
        loss_weighting.name,
        injected={**named, "loss_weights": dict.fromkeys(task_names, 1.0)},
        field="loss_weighting",
        **loss_weighting.params,
    )
    one_task_steps = getattr(SAMPLERS.get(sampling.name), "tasks_per_step", "one") == "one"
    weighting = LOSS_WEIGHTINGS.get(loss_weighting.name)
    if getattr(weighting, "needs_several_tasks", False) and one_task_steps and not mixed_batches:
        import logging

        logging.getLogger("multitune").warning(
            "loss weighting '%s' balances the tasks of a step, but sampler '%s' feeds one task per step, where it "
            "equals 'equal': use sampling.name=all_tasks or training.mixed_batches=true",
            loss_weighting.name,
            sampling.name,
        )
    if gradient is not None:
        field = "gradient_aggregation"
        factory = GRADIENT_AGGREGATORS.get(gradient.name, field=f"{field}.name")
        GRADIENT_AGGREGATORS.check_params(gradient.name, gradient.params, AGGREGATOR_INJECTED, field=field)
        GRADIENT_AGGREGATORS.build(gradient.name, injected=named, field=field, **gradient.params)
        sources = getattr(factory, "sources", ())
        if gradient.source not in sources:
            raise ConfigError(
                f"'{gradient.name}' is defined only for the {' and '.join(sources)} source", field=f"{field}.source"
            )
        all_tasks = getattr(SAMPLERS.get(sampling.name), "tasks_per_step", "one") == "all"
        if tasks > 1 and not (all_tasks or mixed_batches):
            raise ConfigError(
                f"'{gradient.name}' combines the gradients of several tasks, but sampler '{sampling.name}' "
                "feeds one task per step: use sampling.name=all_tasks or training.mixed_batches=true",
                field=f"{field}.name",
            )
        if mixed_precision == "fp16":
            raise ConfigError(
                "gradient aggregation needs bf16 or no mixed precision (fp16 loss scaling would be bypassed)",
                field="training.mixed_precision",
            )


def package_path(relative: str) -> Path:
    return Path(str(resources.files("multitune") / "assets")) / relative


def resolve_path(value: str, base: Path) -> str:
    if value.startswith(PACKAGE_PREFIX):
        return str(package_path(value[len(PACKAGE_PREFIX) :]))
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(config: Config, base: Path) -> None:
    """Make data paths absolute so a saved config runs from anywhere."""
    for task in config.tasks.values():
        source = task.source
        for split in SPLITS:
            value = getattr(source, split)
            if isinstance(value, list):
                setattr(source, split, [resolve_path(v, base) for v in value])
            elif value:
                setattr(source, split, resolve_path(value, base))
        if source.data_files:
            source.data_files = {
                split: [resolve_path(v, base) for v in files] if isinstance(files, list) else resolve_path(files, base)
                for split, files in source.data_files.items()
            }
    if config.guard.baselines_from:
        config.guard.baselines_from = resolve_path(config.guard.baselines_from, base)
    if config.model.init_from:
        config.model.init_from = resolve_path(config.model.init_from, base)
    backbone = config.model.backbone
    if backbone.startswith((".", "/", "~", PACKAGE_PREFIX)):
        config.model.backbone = resolve_path(backbone, base)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
