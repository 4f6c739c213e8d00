"""Typed config groups; `load_config(path, overrides)` turns YAML plus `key.sub=value` overrides into a Config.

Every group forbids unknown keys; an error names the key, the file and, where the YAML has it, the line.
Method groups (`sampling`, `loss_weighting`, `gradient_aggregation`, `model.architecture`) take a registry
name plus that method's own parameters; names are checked against the registries by catalogue.py.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from multitune.config.recipes import RECIPES, with_recipe

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PACKAGE_PREFIX = "multitune:"
SPLITS = ("train", "validation", "test")

TaskType = Literal["classification", "pair_classification", "regression", "token_classification", "generation"]
# image tasks: `type: image_classification` is `type: classification` with `modality: image` (and so for
# regression); the config keeps the second form, so every rule about a task's type holds for images too
IMAGE_TYPES = {"image_classification": "classification", "image_regression": "regression"}
Modality = Literal["text", "image"]
DataFormat = Literal["jsonl", "csv", "tsv", "conll", "hf", "unified", "parallel", "imagefolder", "parquet"]
STREAMABLE = ("jsonl", "csv", "tsv", "conll", "hf", "unified", "parallel", "parquet")
# what the backbone is: an encoder with task heads, a causal or encoder-decoder (seq2seq) LM that also
# generates (models/causal_lm.py), or a vision model with task heads on its pooled features (models/vision.py);
# "auto": vision when every task is an image task, causal_lm when any task is a generation task, else encoder
ModelKind = Literal["auto", "encoder", "causal_lm", "seq2seq", "vision"]


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

    method: str = "lora"  # a registered adapter method (models/adapters/): lora, prefix, prompt, bottleneck
    r: int = Field(8, ge=1)  # LoRA rank
    alpha: int = Field(16, ge=1)  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # LoRA: module names to adapt (default: peft's for the model type)
    shared: bool = False  # also one adapter that every task trains
    train_backbone: bool = False  # also fine-tune the backbone's own weights
    bottleneck_size: int = Field(64, ge=1)
    virtual_tokens: int = Field(20, ge=1)  # prompt: learned input vectors per task; prefix: key/value vectors
    prefix_projection: bool = False  # prefix: produce the prefixes by a two-layer MLP (Li & Liang's reparametrization)


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
    # how tasks share the backbone: a registered architecture (models/architectures.py; `multitune list`)
    architecture: MethodConfig = Field(default_factory=lambda: MethodConfig(name="hard"))
    peft: AdapterConfig | None = None  # one adapter per task (and optionally a shared one)
    # the backbone's attention kernel (transformers' names); default: the model's own choice (usually sdpa)
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    lm_loss_chunk: int = Field(4096, ge=0)  # causal LMs: target tokens per chunk of the fused LM-head loss; 0: off


class GradientConfig(MethodConfig):
    """A gradient aggregator, e.g. `{name: pcgrad, source: representation}`; see balancing/backward.py."""

    source: str = "representation"  # a registered gradient source (balancing/backward.py's GRADIENT_SOURCES)
    buffer_dtype: Literal["float32", "bfloat16"] = "float32"  # the [T, P] buffer of the parameters source


@dataclass
class EarlyStopping:
    """Stop after `patience` validations without a gain above `min_delta`: of the average main score, or
    (per_task) of each task's own score, a stopped task leaving the mix (no longer sampled) and the run
    ending with the last. One type for the config (`training.early_stopping`, validated with the other
    groups) and for `multitune.fit(early_stopping=...)` (checked by fit).

    `count` (per_task only) says what the patience measures: "validations" of the run, or "own_steps", the
    task's own training steps in units of `eval_every`: a task stops once it has trained patience × eval_every
    of its own steps since its best validation without beating it. A task drawn on one step in eight then gets
    the steps to improve that it would get trained alone, where counting validations stops it after an eighth.
    Raises ValueError for count "own_steps" without per_task."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    patience: Annotated[int, Field(ge=1)] = 3  # validations without improvement
    min_delta: Annotated[float, Field(ge=0)] = 0.0  # an improvement must exceed this
    per_task: bool = False
    count: Literal["validations", "own_steps"] = "validations"

    def __post_init__(self) -> None:
        if self.count == "own_steps" and not self.per_task:
            raise ValueError("count: own_steps measures each task's own steps: it needs per_task: true")


class ScheduleConfig(Group):
    """joint: every step draws from the sampler. sequential: tasks one after another (order, fractions).
    two_stage: joint training, then a copy of the model fine-tuned per task (MT-DNN). reptile: blocks of
    inner_steps steps on one task, each followed by the Reptile meta-update with step size meta_lr."""

    name: str = "joint"  # a registered schedule (training/schedules.py's SCHEDULES)
    order: list[str] | None = None  # sequential: the task order (default: the config's)
    fractions: list[float] | None = None  # sequential: each stage's share of the steps (default: equal)
    finetune_steps: int = Field(200, ge=1)  # two_stage: steps of each per-task copy
    finetune_lr: float | None = Field(None, gt=0)  # two_stage: default training.lr
    # two_stage: end a task's refinement after this many validations without a gain on its validation split
    # (finetune_steps is then the most it trains); none: every refinement trains finetune_steps
    finetune_patience: int | None = Field(None, ge=1)
    # two_stage: which predictor answers each task: its refined copy ("refined", as MT-DNN), or whichever of
    # the shared model and the refined copy scores better on the task's validation split ("best"; a copy
    # that does not win is not kept, so the run stores fewer weights)
    keep: Literal["refined", "best"] = "refined"
    # two_stage: what each per-task copy trains and stores: the whole model ("full", as MT-DNN), or a LoRA
    # adapter of rank refine_r on the frozen shared backbone plus the task's head ("lora": a few MB per task)
    refine: Literal["full", "lora"] = "full"
    refine_r: int = Field(8, ge=1)
    # two_stage with refine "lora": adapt only the linear projections of the backbone's top N blocks (a
    # transformer's last N layers), so no gradient flows below them and each step's backward is shorter;
    # none: every linear projection of the backbone
    refine_layers: int | None = Field(None, ge=1)
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
    # what the sampler's probabilities share out: rows, or (tokens) training tokens, each task then drawn with
    # probability ∝ p / its mean row length (data/samplers.py's TokenMix)
    mix_by: Literal["rows", "tokens"] = "rows"
    packing: bool = False  # causal LMs: pack generation examples into rows of pack_length, no padding between
    pack_length: int | None = Field(None, ge=8)  # default: model.max_length
    compile: bool = False  # torch.compile the backbone (dynamic shapes)
    # streamed train splits: rows of a task read and tokenized ahead, per batch of this many, on a background
    # thread while the loop trains (the same rows in the same order); 0: read in the loop
    read_ahead: int = Field(64, ge=0)
    # streamed train splits read ahead: tokenized by this many worker processes (data/workers.py) instead of
    # on the reader thread; 0: on the thread
    tokenize_workers: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(500, ge=1)  # also at the end and on SIGTERM / SIGINT
    keep_checkpoints: int = Field(2, ge=1)
    max_nonfinite_steps: int = Field(5, ge=1)  # skipped updates in a row before the run stops
    tensorboard: bool = False  # also write the history as TensorBoard scalars to RUN_DIR/tensorboard
    progress: bool = True
    early_stopping: EarlyStopping | None = None
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
    # imagefolder: each split is a folder holding one sub-folder of images per class, named by the class
    # parquet: columns by name, read a batch of rows at a time
    # streaming (data/streaming.py): the train split is read lazily, shuffled in a buffer of shuffle_buffer rows
    # and tokenized when drawn, never held whole; validation and test are read into memory, at most max_rows
    # (default STREAMED_EVAL_ROWS) each, a seeded sample. num_rows: the train rows the sampler counts (default:
    # counted in one pass over the files, without parsing them)
    streaming: bool = False
    num_rows: int | None = Field(None, ge=1)
    # default: data/streaming.py's buffer_rows, 10,000 rows a task or fewer, all streamed tasks together at most
    # 100,000 (a mixture of hundreds of tasks holds no more than one of ten)
    shuffle_buffer: int | None = Field(None, ge=1)

    @field_validator("num_rows", "shuffle_buffer")
    @classmethod
    def _streamed_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("streaming"):
            raise ValueError(f"only a streamed source (streaming: true) takes {info.field_name}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> SourceConfig:
        if self.format == "hf":
            if not self.dataset:
                raise ValueError("format 'hf' needs 'dataset' (a hub id, or a builder such as 'json' with data_files)")
        elif not self.train:
            raise ValueError(
                f"format '{self.format}' needs a 'train' {'folder' if self.format == 'imagefolder' else 'file'}"
            )
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError("delimiter must be one character")
        if self.streaming and self.format not in STREAMABLE:
            raise ValueError(f"streaming reads {', '.join(STREAMABLE)} sources, not {self.format}")
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


IMAGE_FORMATS = ("imagefolder", "hf", "jsonl", "csv", "tsv")


class TaskConfig(Group):
    type: TaskType
    source: SourceConfig
    # what a row's input is: text, or (classification and regression) one image, read by a vision backbone's
    # image processor: an image file (path relative to the data file) or a Hugging Face Image column
    modality: Modality = "text"
    text_fields: list[str | int] | None = None  # default by type; pair tasks name two; image tasks: the image
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

    @model_validator(mode="before")
    @classmethod
    def _image_type(cls, data: Any) -> Any:
        """`type: image_classification` -> `type: classification, modality: image` (likewise regression)."""
        if isinstance(data, dict) and isinstance(data.get("type"), str) and data["type"] in IMAGE_TYPES:
            if data.get("modality", "image") != "image":
                raise ValueError(f"type {data['type']} reads images: modality must be image, not {data['modality']}")
            return {**data, "type": IMAGE_TYPES[data["type"]], "modality": "image"}
        return data

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
        self._check_image()
        self._check_streaming()
        if self.text_fields is None:
            self.text_fields = ["image"] if self.modality == "image" else list(DEFAULT_TEXT_FIELDS[self.type])
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

    def _check_streaming(self) -> None:
        if not self.source.streaming:
            return
        if self.max_rows.train is not None:
            raise ValueError("max_rows.train: a streamed train split is read whole, epoch after epoch")
        if self.shuffle_labels:
            raise ValueError("shuffle_labels permutes the train labels in memory: not with streaming")
        if self.modality == "image":
            raise ValueError("streaming: image tasks are read into memory (their pixel values are kept)")

    def _check_image(self) -> None:
        if self.modality == "text":
            if self.source.format == "imagefolder":
                raise ValueError("source format 'imagefolder' feeds image tasks (type: image_classification)")
            return
        if self.type not in IMAGE_TYPES.values():
            raise ValueError(f"an image task is a classification or regression task, not {self.type}")
        if self.source.format not in IMAGE_FORMATS:
            raise ValueError(f"an image task reads {', '.join(IMAGE_FORMATS)} sources, not {self.source.format}")
        if self.source.format == "imagefolder" and self.type != "classification":
            raise ValueError("an imagefolder names each image's class by its folder: it feeds image_classification")
        if self.text_fields is not None and len(self.text_fields) != 1:
            raise ValueError(f"text_fields: an image task takes one field (the image), got {len(self.text_fields)}")

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


class DiscoverConfig(Group):
    """Tasks found in the data instead of named one by one (data/discovery.py): with format `unified`, one
    task per value of the records' `task` field; with a folder as `train` (jsonl, csv, tsv or conll files),
    one task per file, named by its stem, its validation and test files the same names in the folders those
    splits give. Every task gets `type`, the source, and `defaults` (any task key); `overrides` gives one
    task's own keys over those. A task value that is not a valid task name (`flan/cot`) is named with `_`
    for each character a name may not hold (`flan_cot`)."""

    source: SourceConfig
    type: TaskType = "generation"
    defaults: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Config(Group):
    recipe: Literal["recommended"] | None = None  # settings filled in under the config's own (config/recipes.py)
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sampling: MethodConfig = Field(default_factory=lambda: MethodConfig(name="temperature", temperature=2.0))
    loss_weighting: MethodConfig = Field(default_factory=lambda: MethodConfig(name="equal"))
    gradient_aggregation: GradientConfig | None = None
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    discover: DiscoverConfig | None = None  # expanded into `tasks` when the config is loaded
    tasks: dict[str, TaskConfig] = Field(default_factory=dict, validate_default=True)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: dict[str, TaskConfig], info: ValidationInfo) -> dict[str, TaskConfig]:
        if not tasks and info.data.get("discover") is None:
            raise ValueError("name at least one task (or let `discover` find them in the data)")
        for name in tasks:
            _check_name(name, "task name")
            if "." in name:  # a task names a head and an adapter: torch's module names cannot hold a dot
                raise ValueError(f"task name '{name}' may not contain '.' (use '_' or '-')")
        return tasks

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("recipe"), str) and data["recipe"] in RECIPES:
            return with_recipe(data, data["recipe"])
        return data  # no recipe, or an unknown one: the field's own check names it

    @model_validator(mode="after")
    def _kind(self) -> Config:
        generative = [name for name, task in self.tasks.items() if task.type == "generation"]
        images = [name for name, task in self.tasks.items() if task.modality == "image"]
        texts = [name for name in self.tasks if name not in images]
        if images and texts:
            raise ValueError(
                f"model.kind: image task '{images[0]}' and text task '{texts[0]}' need one backbone that reads both, "
                "and multitune's vision backbones read images only: train them as two runs"
            )
        if self.model.kind == "auto":
            self.model.kind = "vision" if images else "causal_lm" if generative else "encoder"
        elif self.model.kind == "encoder" and generative:
            raise ValueError(f"model.kind: generation task '{generative[0]}' needs a causal_lm or seq2seq backbone")
        elif (self.model.kind == "vision") != bool(images) and self.tasks:
            which = f"image task '{images[0]}'" if images else f"text task '{texts[0]}'"
            want = "a vision backbone (model.kind: vision)" if images else "a text backbone, not a vision one"
            raise ValueError(f"model.kind: {which} needs {want}")
        return self


def known_keys(path: tuple[str, ...]) -> list[str]:
    """The keys the group at `path` (e.g. ('tasks', 'sst2', 'source')) takes, from the schema; [] if unknown."""
    kind: Any = Config
    for part in path:
        kind = _group_of(kind)
        if kind is None:
            return []
        fields = _fields(kind)
        if fields is not None:
            if part not in fields:
                return []
            kind = fields[part]
        elif typing.get_origin(kind) is dict:  # a dict of groups (tasks): any key, the value's type
            kind = typing.get_args(kind)[1]
        else:
            return []
    return list(_fields(_group_of(kind)) or [])


def _fields(kind: Any) -> dict[str, Any] | None:
    """A group's keys and their types: a pydantic model's fields or a dataclass's (EarlyStopping); else None."""
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return {name: info.annotation for name, info in kind.model_fields.items()}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return {field.name: hints[field.name] for field in dataclasses.fields(kind)}
    return None


def _group_of(kind: Any) -> Any:
    """`X | None` -> X: the group behind an optional setting."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind
