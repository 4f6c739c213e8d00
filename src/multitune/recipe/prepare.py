"""Everything that can fail on the user's input (config, data, backbone) runs here, before the run directory
is created: tasks read, backbone loaded, model assembled, splits encoded."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitune.config import Config
from multitune.data.encoding import encode, encode_splits
from multitune.data.streaming import ReadAheadRows, StreamedRows, reservoir
from multitune.data.streams import RowStream
from multitune.data.tasks import (
    Example,
    TaskData,
    load_tasks,
)
from multitune.data.tokens import Encoded
from multitune.data.windows import PredictionRow, scoring_rows
from multitune.data.workers import TokenizerPool
from multitune.errors import ConfigError
from multitune.evaluation.evaluate import evaluate
from multitune.models.assemble import (
    LOADERS,
    backbone_modules,
    build_model,
    compile_backbone,
    enable_gradient_checkpointing,
    load_backbone_weights,
)
from multitune.models.backbone import Backbone, load_backbone
from multitune.models.causal_lm import (
    CausalLMMultiTask,
)
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.components import build_stream
from multitune.runs.layout import match_resumed_data


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
    samples: dict[str, list[Encoded]] = field(default_factory=dict)  # streamed splits' samples (training_sample)
    read_ahead: tuple[ThreadPoolExecutor, Any] | None = None  # streamed splits' reader thread and its tokenizer
    tokenizer_pool: TokenizerPool | None = None  # training.tokenize_workers: the processes that tokenize them

    def close(self) -> None:
        """Stop the reader thread and the tokenizing processes, if any ran."""
        if self.read_ahead is not None:
            self.read_ahead[0].shutdown(wait=True, cancel_futures=True)
            self.read_ahead = None
        if self.tokenizer_pool is not None:
            self.tokenizer_pool.close()
            self.tokenizer_pool = None

    def encoder(self, name: str, tokenizer: Any = None) -> Callable[[list[Example]], list[Encoded]]:
        """Task `name`'s examples -> Encoded rows, as its splits were encoded (a streamed split's rows); with
        `tokenizer`, a copy of the backbone's, for use on another thread."""
        task, tokenizer, max_length, decoder_targets = self.encoding(name, tokenizer)
        return lambda examples: encode(examples, task, tokenizer, max_length, decoder_targets=decoder_targets)

    def encoding(self, name: str, tokenizer: Any = None) -> tuple[TaskData, Any, int, bool]:
        """What encoding task `name`'s rows takes: its data, the tokenizer (the backbone's unless given), the
        model's max_length and whether targets go to a decoder (a seq2seq LM)."""
        model = self.config.model
        tokenizer = self.backbone.tokenizer if tokenizer is None else tokenizer
        return self.tasks[name], tokenizer, model.max_length, model.kind == "seq2seq"

    def training_stream(self, name: str, seed: str) -> RowStream[Encoded]:
        """Task `name`'s training rows as an endless seeded stream: its encoded rows, or a streamed split."""
        stream = self.tasks[name].stream
        if stream is None:
            return build_stream(self.encoded[name]["train"], seed, self.config.training)
        if self.config.training.group_by_length:
            raise ConfigError(
                f"task '{name}' streams its train split, which is never whole: it cannot be grouped by length",
                field="training.group_by_length",
            )
        chunk, processes = self.config.training.read_ahead, self.config.training.tokenize_workers
        if not chunk:
            if processes:
                raise ConfigError(
                    "tokenizing in worker processes needs rows read ahead: set training.read_ahead above 0",
                    field="training.tokenize_workers",
                )
            return StreamedRows(stream, self.encoder(name), seed)
        if self.read_ahead is None:  # one thread, one tokenizer copy, for every streamed task
            self.read_ahead = (ThreadPoolExecutor(1, "multitune-read-ahead"), copy.deepcopy(self.backbone.tokenizer))
        worker, tokenizer = self.read_ahead
        if processes and self.tokenizer_pool is None:  # every streamed task's encoding, sent once per process
            streamed = [n for n, t in self.tasks.items() if t.stream is not None]
            self.tokenizer_pool = TokenizerPool(processes, {n: self.encoding(n, tokenizer) for n in streamed})
        encoder = self.encoder(name, tokenizer) if self.tokenizer_pool is None else self.tokenizer_pool.encoder(name)
        return ReadAheadRows(stream, encoder, seed, worker, chunk)

    def training_sample(self, name: str) -> list[Encoded]:
        """Task `name`'s encoded training rows: all of them, or of a streamed split a seeded uniform sample as
        large as its shuffle buffer (one pass over the split; all its rows when it fits the buffer), e.g. for
        its mean row length (mix_by: tokens) or the task-relation probes."""
        stream = self.tasks[name].stream
        if stream is None:
            return self.encoded[name]["train"]
        if name not in self.samples:  # one pass per task, however many users ask
            sample = reservoir(stream.open(), stream.buffer, f"{self.config.run.seed}:{name}:sample")
            self.samples[name] = self.encoder(name)(sample)
        return self.samples[name]

    @property
    def pad_id(self) -> int:
        return self.backbone.pad_id

    def score(
        self, split: str, device: torch.device, model: Any = None, progress: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Every task's results on `split` (evaluation/evaluate.py) by `model` (default: the prepared model;
        a run passes the one it trains, wrapped for its processes), at training.eval_batch_size rows a batch."""
        chosen = self.model if model is None else model
        size = self.config.training.eval_batch_size
        return evaluate(chosen, self.tasks, self.scored, split, size, device, self.pad_id, progress=progress)


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
    model = build_model(model_config, tasks, backbone)
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
    if model_config.kind == "vision":
        check_images(model, encoded)
    scored = scoring_rows(tasks, encoded, backbone.tokenizer, model_config.max_length)
    return Prepared(config, tasks, backbone, model, encoded, scored, rows_added)


def check_images(model: MultiTaskModel, encoded: dict[str, dict[str, list[Encoded]]]) -> None:
    """Every task's images are one size (they share batches) and the model reads them: one row of each task
    through the model, before the run directory exists. Raises DataError naming the task otherwise."""
    from multitune.data.collate import collate
    from multitune.errors import DataError

    shapes = {name: rows[0].pixel_values.shape for name, splits in encoded.items() for rows in splits.values() if rows}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise DataError(f"the tasks' images are not one size after processing ({described})", field="model.backbone")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, splits in encoded.items():
                rows = next((rows[:1] for rows in splits.values() if rows), [])
                try:
                    model(collate({name: rows}, 0))
                except (RuntimeError, ValueError, TypeError) as error:
                    first = str(error).splitlines()[0] if str(error) else type(error).__name__
                    raise DataError(
                        f"the backbone cannot read task '{name}''s images: {first}", field="model.backbone"
                    ) from None
    finally:
        model.train(was)
