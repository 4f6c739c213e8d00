"""A finished run, ready to answer: its tasks, its model(s), and one inference call over rows of several tasks.

Rows of every task that one model answers are padded into one `collate` batch, so a single backbone
forward serves several tasks: the model routes each row to its task's head (and, with per-task adapters,
to its task's adapter). Generations of several tasks share a batch too (generate_many): on a decoder-only LM
a continuous one that rows join and leave between steps (models/decoding.py), elsewhere the model's
`generate_texts` a chunk at a time. A two-stage run
(`finetuned/TASK`) answers each task with its own fine-tuned copy, so its tasks cannot share a forward.
The encoding and decoding are those of `multitune predict` (runs/predict.py's encode_for_prediction, and
evaluation/evaluate.py's decoding).
"""

from __future__ import annotations

import collections
import copy
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from multitune.config import Config
from multitune.data.collate import collate
from multitune.data.prompts import conversation_ids
from multitune.data.readers import Row
from multitune.data.tasks import TaskData
from multitune.data.tokens import Encoded, text_ids
from multitune.data.windows import PredictionRow, expand, gather
from multitune.errors import MultitunError
from multitune.evaluation.evaluate import decode
from multitune.evaluation.generation import generate_predictions
from multitune.models.backbone import Backbone
from multitune.models.causal_lm import CausalLMMultiTask
from multitune.models.decoding import JoiningBatch, can_join
from multitune.models.multitask import MultiTaskModel
from multitune.runs.layout import FINETUNED
from multitune.runs.load import load_refined, load_run, refined, task_from_manifest
from multitune.runs.predict import InputSchema, encode_for_prediction, held_to_range, input_schema, prediction_bounds

T = TypeVar("T")
PADDING_SLACK = 64  # padded positions a batch may add rather than run one more forward
Part = tuple[str, Sequence[PredictionRow]]  # one task's encoded records, as one request sent them


BASE = "base"  # the name the OpenAI routes give the pretrained model itself (every task's adapter off)
BASE_MAX_NEW_TOKENS = 256  # the base model's default cap on new tokens, where the run has no generation task
UNLOADED: list[dict[str, Any]] = []  # a part whose task was unloaded while it waited (the routes answer 404)


class TaskGone(MultitunError):
    """The task is not (or no longer) served: a 404, not a bad record."""


class Cancelled(MultitunError):
    """A generation was stopped before its end because its client left."""


class Watch:
    """A transformers streamer (put, end) that watches one generation: it counts the new tokens, keeps the
    last one, hands each to `inner` (e.g. a TextIteratorStreamer), calls `between` (other work for the
    generation's thread) and stops the generation, by raising Cancelled from `put`, once `cancel` is set
    (its client left). Generation shows a streamer the prompt first, then each new token."""

    def __init__(self, inner: Any = None, between: Callable[[], None] | None = None) -> None:
        """`between`: called after each token on the generation's thread (the batcher runs the batches
        waiting for that thread there)."""
        self.inner = inner
        self.between = between
        self.cancel = threading.Event()
        self.tokens = 0  # new tokens so far
        self.last: int | None = None  # the last new token's id
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.cancel.is_set():
            raise Cancelled("the client left: generation stopped")
        if self._prompt_seen:
            self.tokens += int(value.numel())
            self.last = int(value.reshape(-1)[-1])
        self._prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)
        if self.between is not None:
            self.between()

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


@dataclass
class Asked:
    """One generation asked of the engine: `task` (or BASE) continues `row` by at most `max_new_tokens` new
    tokens, each shown to `watch` (if any)."""

    task: str
    row: Encoded
    watch: Watch | None
    max_new_tokens: int

    @property
    def prompt(self) -> Sequence[int]:
        row = self.row
        return row.input_ids[: row.prompt_length] if row.prompt_length is not None else row.input_ids


class GeneratedRow:
    """One row of a batched generation: its new tokens (`ids`) up to its end of sequence or its own `limit`,
    each shown to its watch, whose end comes as soon as the row's does (its client need not wait for the
    batch's longest row). A watch whose client left (Cancelled) ends its row alone (`cancelled`), as does a
    watch that raises anything else (`failed`)."""

    def __init__(self, watch: Watch | None, limit: int, eos: int | None) -> None:
        self.watch, self.limit, self.eos = watch, limit, eos
        self.live, self.cancelled = True, False
        self.failed: Exception | None = None
        self.ids: list[int] = []

    def start(self, prompt: torch.Tensor) -> None:
        """Show the watch the prompt [1, L] (a streamer skips it); a row with no room for a token ends here."""
        if self.watch is not None:
            self._show(prompt)
        if self.live and self.limit < 1:
            self.finish()

    def add(self, token: int) -> None:
        """The row's next new token (nothing once the row has ended)."""
        if not self.live:
            return
        self.ids.append(token)
        if self.watch is not None:
            self._show(torch.tensor([token]))
        if self.live and (token == self.eos or len(self.ids) >= self.limit):
            self.finish()

    def _show(self, value: torch.Tensor) -> None:
        assert self.watch is not None
        try:
            self.watch.put(value)
        except Cancelled:
            self.cancelled = True
            self.finish()
        except Exception as error:  # its reader broke: this row ends with that error, the others go on
            self.failed = error
            self.finish()

    def finish(self) -> None:
        if not self.live:
            return
        self.live = False
        if self.watch is not None:
            self.watch.end()

    def result(self, tokenizer: Any) -> str | BaseException:
        """Its text (special tokens left out, as generate_texts decodes), or Cancelled if its client left."""
        if self.cancelled:
            return Cancelled("the client left: generation stopped")
        if self.failed is not None:
            return self.failed
        return str(tokenizer.decode(self.ids, skip_special_tokens=True)).strip()


class RowsStreamer:
    """The streamer of a batch generated whole (put [B, L] prompts, then [B] new tokens per step; end): each
    row a GeneratedRow. Once no row is left going, for whatever reason, the generation stops (Cancelled,
    which the engine expects), its rows' tokens kept: no step runs for a batch whose rows have all ended."""

    def __init__(self, rows: Sequence[GeneratedRow]) -> None:
        self.rows = list(rows)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the prompts: each watch sees its own first (and skips it)
            self._prompt_seen = True
            for i, row in enumerate(self.rows):
                row.start(value[i : i + 1])
        else:
            for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
                row.add(int(token))
        if not any(row.live for row in self.rows):
            raise Cancelled("every row of the batch has ended: generation stopped")

    def end(self) -> None:
        for row in self.rows:
            row.finish()


# more(accept, room): up to `room` generations waiting now that `accept` takes, from the front of the queue
# and stopping at the first it refuses (so no other generation is passed over); Engine.generate_many's rows
# that may join a running batch
More = Callable[[Callable[["Asked"], bool], int], Sequence["Asked"]]
Done = Callable[["Asked", "str | BaseException"], None]


@dataclass
class Loaded:
    """A task of another run, loaded and checked, waiting to be registered (Engine.loadable)."""

    task: str
    run: str
    model: MultiTaskModel
    data: TaskData
    schema: InputSchema
    bounds: Any
    metrics: dict[str, Any] | None
    host: int | None = None  # the served model whose backbone it joins (its head and LoRA adapter only), if any


@dataclass
class Stats:
    """What the inference thread has done so far (for /healthz and the load test)."""

    batches: int = 0
    rows: int = 0
    tasks_per_batch: dict[int, int] = field(default_factory=dict)  # number of tasks -> batches with that many


def served_task(
    config: Config, manifest: dict[str, Any], name: str
) -> tuple[TaskData, InputSchema, tuple[float, float] | None]:
    """Task `name` of a run as the server answers it: its data (labels, target scaling), the input schema its
    requests are checked by, and the range its regression predictions are held to."""
    data = task_from_manifest(name, config.tasks[name], manifest[name])
    return data, input_schema(name, config.tasks[name]), prediction_bounds(data, manifest[name])


def run_metrics(run: Path) -> dict[str, Any]:
    """A run's metrics.json, or {} for a run without one."""
    path = run / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}  # type: ignore[no-any-return]


class Engine:
    """A run's models and tasks; `run` and `generate_one` must be called from one thread at a time."""

    def __init__(self, run_dir: str | Path, one_model_per_task: bool = False, batch_size: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        config, manifest, model, backbone = load_run(run_dir)
        self.config: Config = config
        self.backbone: Backbone = backbone
        # requests are tokenized on the event loop while the inference thread may decode: a fast tokenizer
        # must not be used from two threads at once ("Already borrowed"), so requests get their own copy
        self.request_tokenizer = copy.deepcopy(backbone.tokenizer)
        served = {name: served_task(config, manifest, name) for name in config.tasks}
        self.tasks: dict[str, TaskData] = {name: data for name, (data, _, _) in served.items()}
        self.schemas: dict[str, InputSchema] = {name: schema for name, (_, schema, _) in served.items()}
        self.bounds = {name: bounds for name, (_, _, bounds) in served.items()}
        self.batch_size = batch_size or config.training.eval_batch_size
        self.pad_id = backbone.pad_id
        self.models: list[MultiTaskModel | None] = []  # None: a model whose tasks were all unloaded
        self.model_of: dict[str, int] = {}
        finetuned = self.run_dir / FINETUNED
        # the pretrained model answers as BASE where the run left its weights as they were (per-task adapters
        # on a frozen backbone) and no refinement is merged into the model that holds it
        self.base: CausalLMMultiTask | None = pretrained_model(config, model)
        if one_model_per_task or finetuned.is_dir():  # a full copy per task
            # a two-stage run that kept the better predictor per task: the shared model answers the others
            shared = [] if one_model_per_task else [n for n in self.tasks if refined(self.run_dir, n) is None]
            if shared:
                self.models.append(model)
                self.model_of.update(dict.fromkeys(shared, 0))
            for name in self.tasks:
                if name in shared:
                    continue
                copied = model if not self.models else copy.deepcopy(model)  # `model` itself while it is unused
                if copied is model:  # a refinement goes into its weights: it is not the pretrained model any more
                    self.base = None
                load_refined(copied, self.run_dir, name)  # its own copy's weights, or a LoRA refinement merged in
                self.model_of[name] = len(self.models)
                self.models.append(copied)
        else:
            self.models.append(model)
            self.model_of = dict.fromkeys(self.tasks, 0)
        self.metrics: dict[str, Any] = run_metrics(self.run_dir)
        self.task_metrics: dict[str, Any] = dict(self.metrics.get("tasks") or {})
        self.sources: dict[str, str] = dict.fromkeys(self.tasks, str(self.run_dir.resolve()))  # each task's run
        self.adopted: set[str] = set()  # loaded tasks that joined a served model (head and adapter only)
        # held while an adapter joins or leaves a served model, and while `_host` reads that model's weights off
        # the inference thread (peft's injection changes the module dicts that state_dict walks)
        self.adapters_changing = threading.Lock()
        self.stats = Stats()

    # --- tasks loaded and unloaded at run time --------------------------------------------------

    def loadable(self, run_dir: str | Path, task: str) -> Loaded:
        """Task `task` of another run, ready to register: where it fits (`_host`), only its head and LoRA adapter
        join a served model; else its own model (its refined copy merged in, for a two-stage run) answers it.
        Slow (reads the weights); touches nothing of this engine, so it may run on any thread. Raises
        MultitunError (one line) for a run that is not a finished run, lacks the task, or was not trained on
        this run's backbone, model kind and max_length (requests are encoded with this run's tokenizer)."""
        run = Path(run_dir)
        config, manifest, model, backbone = load_run(run)
        if task not in config.tasks:
            raise MultitunError(f"no task '{task}' in that run (tasks: {', '.join(config.tasks)})", file=str(run))
        mine, theirs = self.config.model, config.model
        for key in ("backbone", "revision", "kind", "max_length"):
            if getattr(mine, key) != getattr(theirs, key):
                raise MultitunError(
                    f"not compatible: its model.{key} is {getattr(theirs, key)!r}, "
                    f"this server's {getattr(mine, key)!r}",
                    file=str(run),
                )
        differs = input_difference(self.backbone.tokenizer, backbone.tokenizer)
        if differs is not None:  # the same name, other files (a local folder changed, another machine's copy)
            raise MultitunError(
                f"not compatible: {differs} differs from this server's (its requests would be encoded wrongly)",
                file=str(run / "backbone"),
            )
        host = None if refined(run, task) is not None else self._host(config, model, task)
        load_refined(model, run, task)
        model.eval()
        data, schema, bounds = served_task(config, manifest, task)
        scores = (run_metrics(run).get("tasks") or {}).get(task)
        return Loaded(task, str(run.resolve()), model, data, schema, bounds, scores, host)

    def _host(self, config: Config, model: MultiTaskModel, task: str) -> int | None:
        """The served model that task `task` of `model` can join for the cost of its head and LoRA adapter, or
        None. Both must be per-task LoRA (no shared adapter) on a frozen backbone whose own features each task
        reads (hard sharing, an LM), of the same model class, pooling, rank, alpha and adapted layers, with
        every backbone weight equal, and the host must hold no adapter of that name already."""
        theirs = model.task_adapters
        if theirs is None or config.model.peft is None or config.model.peft.train_backbone:
            return None
        if self.config.model.peft is None or self.config.model.peft.train_backbone:
            return None
        weights = _base_weights(model)
        for index, host in enumerate(list(self.models)):
            mine = getattr(host, "task_adapters", None)
            if host is None or mine is None or type(host) is not type(model) or not host.backbone_features:
                continue
            if host.pooling != model.pooling or task in mine.tasks or mine.can_adopt(theirs) is not None:
                continue
            with self.adapters_changing:
                own = _base_weights(host)
            if own.keys() == weights.keys() and all(torch.equal(own[k], weights[k]) for k in own):
                return index
        return None

    def register(self, loaded: Loaded) -> None:
        """Answer `loaded`'s task from now on (call on the inference thread, between batches). Raises
        MultitunError when a task of that name is already served."""
        if loaded.task in self.tasks:
            raise MultitunError(f"task '{loaded.task}' is already served (from {self.sources[loaded.task]})")
        if loaded.task == BASE and self.base is not None:
            raise MultitunError(f"'{BASE}' names this server's pretrained model: a task of that name cannot be loaded")
        host = self.models[loaded.host] if loaded.host is not None else None
        if host is not None and host.task_adapters is not None and loaded.task not in host.task_adapters.tasks:
            with self.adapters_changing:
                adopt(host, loaded.model, loaded.task)  # its head and adapter join a served backbone
            self.model_of[loaded.task] = loaded.host  # type: ignore[assignment]
            self.adopted.add(loaded.task)
        else:  # its whole model, beside the others
            self.models.append(loaded.model)
            self.model_of[loaded.task] = len(self.models) - 1
        self.schemas[loaded.task], self.bounds[loaded.task] = loaded.schema, loaded.bounds
        self.task_metrics[loaded.task], self.sources[loaded.task] = loaded.metrics, loaded.run
        self.tasks[loaded.task] = loaded.data  # last: the routes find the task only once it is complete

    def unload(self, task: str) -> None:
        """Stop answering `task` (call on the inference thread, between batches); a model no task uses any
        more is let go. Requests for it still queued are answered 404. Raises MultitunError for an unknown task
        or the last one."""
        if task not in self.tasks:
            raise unknown_task(task, list(self.tasks))
        if len(self.tasks) == 1:
            raise MultitunError(f"'{task}' is the only task served: a server answers at least one")
        del self.tasks[task]  # first: the routes stop finding it
        index = self.model_of.pop(task)
        for table in (self.schemas, self.bounds, self.task_metrics, self.sources):
            table.pop(task, None)
        if task in self.adopted:  # its head and adapter leave the backbone they joined
            self.adopted.discard(task)
            with self.adapters_changing:
                release(self.models[index], task)  # type: ignore[arg-type]
        if index not in self.model_of.values():
            self.models[index] = None  # keeps the other tasks' indices

    # --- requests -> rows -----------------------------------------------------------------------

    def encode(self, task: str, records: Sequence[dict[str, Any]]) -> Sequence[PredictionRow]:
        """Request records of `task` as model rows (a long token record as its windows); a bad record raises
        MultitunError naming its index."""
        data = self.tasks.get(task)
        if data is None:  # unloaded meanwhile
            raise TaskGone(str(unknown_task(task, list(self.tasks))))
        rows = [Row(dict(record), f"inputs[{i}]", 0) for i, record in enumerate(records)]
        return encode_for_prediction(self.config.model, data, self.request_tokenizer, rows, local_files=False)

    def is_generative(self, task: str) -> bool:
        data = self.tasks.get(task)
        return data is not None and data.config.type == "generation"

    def generation_tasks(self) -> list[str]:
        """The generation tasks served now (tasks may be loaded and unloaded at run time)."""
        return [name for name, data in list(self.tasks.items()) if data.config.type == "generation"]

    def encode_base(self, messages: Sequence[tuple[str, str]] | None, prompt: str | None = None) -> Encoded:
        """The pretrained model's prompt row: a conversation ([(role, text), ...]) through the chat template
        (data/prompts.py's conversation_ids), or a plain `prompt` to continue. Raises TaskGone where the run
        keeps no pretrained model (BASE), MultitunError for text that cannot be encoded or that leaves the
        model's context no room (field messages or prompt)."""
        if self.base is None:
            raise TaskGone(f"no '{BASE}' model: {no_base(self.config)}")
        tokenizer = self.request_tokenizer
        if messages is not None:
            ids, where = conversation_ids(tokenizer, messages), "messages"
        else:
            ids, where = text_ids(tokenizer, prompt or "", add_special_tokens=True), "prompt"
        room = self.base.context_room(len(ids))
        if room is not None and room < 1:
            raise MultitunError(
                f"{len(ids)} tokens: they leave no room for an answer in the model's {len(ids) + room}-token context",
                field=where,
            )
        return Encoded(ids, None, None, prompt_length=len(ids))

    # --- inference (one thread) -----------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self, parts: Sequence[Part], done: Callable[[int, list[dict[str, Any]]], None] | None = None
    ) -> list[list[dict[str, Any]]]:
        """Each part's predictions, as `multitune predict` gives them; rows of all tasks that share a model
        go through the backbone together, in length-sorted batches of at most `batch_size` rows. `done(p,
        answer)`, when given, hears of each part as soon as its last row is answered (a part of short rows
        before the long rows' forward runs), so a server can reply without waiting for the whole call. A
        part whose task was unloaded while it waited gets UNLOADED."""
        expanded = [expand(records) for _, records in parts]  # a long token record: one row per window
        results: list[list[dict[str, Any]]] = [[{} for _ in rows] for rows, _ in expanded]
        gone = {p for p, (task, _) in enumerate(parts) if task not in self.model_of}  # unloaded while queued
        left = [len(rows) for rows, _ in expanded]
        answers: list[list[dict[str, Any]] | None] = [None] * len(parts)

        def finished(p: int) -> None:
            answers[p] = UNLOADED if p in gone else gather(parts[p][1], results[p], expanded[p][1])
            if done is not None:
                done(p, answers[p])  # type: ignore[arg-type]

        def answered(items: Sequence[int]) -> None:
            for p in items:
                left[p] -= 1
                if left[p] == 0:
                    finished(p)

        for p in range(len(parts)):
            if p in gone or not left[p]:
                finished(p)
        for index, model in enumerate(self.models):
            if model is None:
                continue
            mine = [
                (p, task, expanded[p][0])
                for p, (task, _) in enumerate(parts)
                if p not in gone and self.model_of[task] == index
            ]
            heads = [
                (p, i, task, row)
                for p, task, rows in mine
                if not self.is_generative(task)
                for i, row in enumerate(rows)
            ]
            heads.sort(key=lambda item: len(item[3].input_ids))  # less padding per batch
            for chunk in padded_chunks(heads, [len(item[3].input_ids) for item in heads], self.batch_size):
                self._forward(model, chunk, results)
                answered([p for p, *_ in chunk])
            for task in dict.fromkeys(task for _, task, _ in mine if self.is_generative(task)):
                flat = [(p, i, row) for p, name, rows in mine if name == task for i, row in enumerate(rows)]
                texts = generate_predictions(
                    model, self.tasks[task], [r for *_, r in flat], self.batch_size, self.pad_id
                )
                for (p, i, _), text in zip(flat, texts, strict=True):
                    results[p][i] = text
                self._count(len(flat), 1)
                answered([p for p, *_ in flat])
        return [answer if answer is not None else [] for answer in answers]

    def _forward(
        self, model: MultiTaskModel, chunk: list[tuple[int, int, str, Encoded]], results: list[list[dict[str, Any]]]
    ) -> None:
        by_task: dict[str, list[tuple[int, int, Encoded]]] = {}
        for p, i, task, row in chunk:
            by_task.setdefault(task, []).append((p, i, row))
        batch = collate({task: [row for *_, row in items] for task, items in by_task.items()}, self.pad_id)
        outputs = model(batch)
        for task, items in by_task.items():
            out = outputs[task].float().cpu()
            for j, (p, i, row) in enumerate(items):
                results[p][i] = held_to_range(decode(self.tasks[task], out[j], row), self.bounds[task])
        self._count(len(chunk), len(by_task))

    def _count(self, rows: int, tasks: int) -> None:
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.tasks_per_batch[tasks] = self.stats.tasks_per_batch.get(tasks, 0) + 1

    def generation_limit(self, task: str, prompt_tokens: int, asked: int | None = None) -> int:
        """The most new tokens a generation for `task` may take after a prompt of `prompt_tokens`: `asked` (a
        request's max_tokens), else the task's max_new_tokens, held to what is left of the model's context.
        Raises MultitunError (field max_tokens) when `asked` does not fit in it."""
        model = self._model(task)
        room = model.context_room(prompt_tokens) if isinstance(model, CausalLMMultiTask) else None
        if asked is not None and room is not None and asked > room:
            raise MultitunError(
                f"the prompt takes {prompt_tokens} tokens of the model's {prompt_tokens + room}-token context: "
                f"at most {max(room, 0)} new tokens fit, not {asked}",
                field="max_tokens",
            )
        limit = asked or self._default_new_tokens(task)
        return limit if room is None else max(0, min(limit, room))

    def _default_new_tokens(self, task: str) -> int:
        if task == BASE and task not in self.tasks:  # the longest of the run's generation tasks
            generative = [self.tasks[name].config.max_new_tokens for name in self.generation_tasks()]
            return max(generative, default=BASE_MAX_NEW_TOKENS)
        return self.tasks[task].config.max_new_tokens

    def _model(self, task: str) -> Any:
        """The model answering `task` (BASE: the pretrained model); TaskGone when it is not (or no longer)
        served."""
        if task == BASE and task not in self.tasks:
            if self.base is None:
                raise TaskGone(f"no '{BASE}' model: {no_base(self.config)}")
            return self.base
        index = self.model_of.get(task)
        if index is None or task not in self.tasks:  # unloaded meanwhile
            raise TaskGone(str(unknown_task(task, list(self.tasks))))
        return self.models[index]

    def generate_one(
        self, task: str, row: Encoded, watch: Watch | None = None, max_new_tokens: int | None = None
    ) -> str:
        """One greedy generation for `task` (at most `max_new_tokens` new tokens, default the task's own, held
        to the model's context), each new token shown to `watch` (if any), which may stop it (Cancelled):
        generate_many with one row."""
        asked = Asked(task, row, watch, max_new_tokens or 0)
        if max_new_tokens is None:
            try:
                asked.max_new_tokens = self.generation_limit(task, len(asked.prompt))
            except BaseException:  # TaskGone: unloaded while the request waited
                if watch is not None:
                    watch.end()  # a reader waiting for the next piece is released
                raise
        [text] = self.generate_many([asked])
        if isinstance(text, BaseException):
            raise text
        return text

    @torch.inference_mode()
    def generate_many(
        self,
        asked: Sequence[Asked],
        more: More | None = None,
        done: Done | None = None,
        between: Callable[[], None] | None = None,
    ) -> list[str | BaseException]:
        """Several greedy generations at once: those answered by one model go through it together, tasks mixed
        where their adapters sit inside the backbone (LoRA, or a model without per-task adapters), the
        pretrained model's (BASE) rows apart, and a prefix-tuned task's rows apart. Each row is exactly its
        generation alone: at most its own max_new_tokens, each new token shown to its own watch.

        On a decoder-only LM the batch runs continuously (models/decoding.py): at most `batch_size` rows at a
        time, a row leaving as soon as it ends and the next one joining in its place, from `asked` and then
        from `more` (generations that arrived meanwhile). Elsewhere rows run in chunks, each chunk to its
        end. `done(item, result)` hears each generation as soon as it ends (a joined one included);
        `between()` runs after each step of a running batch (other work for this thread).
        Returns the text, or the error that ended it (TaskGone for a task unloaded while it waited,
        Cancelled for one whose client left), of each of `asked`."""
        results: dict[int, str | BaseException] = {}

        def finish(item: Asked, result: str | BaseException) -> None:
            results[id(item)] = result
            if done is not None:
                done(item, result)

        groups: dict[tuple[int, str], list[Asked]] = {}
        for item in asked:
            try:
                key = self._generation_group(item)
            except TaskGone as error:
                if item.watch is not None:
                    item.watch.end()
                finish(item, error)
                continue
            groups.setdefault(key, []).append(item)
        # the batches that take no rows mid-run go first; only the last batch takes rows that arrive (`more`),
        # so no row taken here waits behind a batch that keeps running
        runs = [(key, members, self._model(members[0].task)) for key, members in groups.items()]
        ordered = sorted(((can_join(model), key, members, model) for key, members, model in runs), key=lambda r: r[0])
        for n, (joinable, key, members, model) in enumerate(ordered):
            if joinable:
                self._generate_joining(model, key, members, more if n == len(ordered) - 1 else None, finish, between)
                continue
            members.sort(key=lambda item: len(item.prompt))
            for chunk in self._generation_chunks(model, members):
                items = [members[j] for j in chunk]
                try:
                    self._generate_chunk(model, key[1], items, finish)
                except Exception as error:  # this chunk's rows fail (their watches ended); the others stand
                    for item in items:
                        finish(item, error)
        return [results[id(item)] for item in asked]

    def _generation_group(self, item: Asked) -> tuple[int, str]:
        """Which generations may share a batch: (the model, 'base' / 'tasks' / a prefix-tuned task's name).
        Raises TaskGone for a task unloaded meanwhile."""
        model = self._model(item.task)
        adapters = model.task_adapters
        base = item.task == BASE and item.task not in self.tasks
        return id(model), "base" if base else "tasks" if adapters is None or adapters.inside_backbone else item.task

    def _generate_joining(
        self,
        model: Any,
        key: tuple[int, str],
        members: list[Asked],
        more: More | None,
        finish: Done,
        between: Callable[[], None] | None,
    ) -> None:
        """The generations of one group as one running batch that rows join and leave between steps."""
        tokenizer = self.backbone.tokenizer
        waiting = collections.deque(members)
        batch = JoiningBatch(model, self.pad_id)
        running: list[tuple[Asked, GeneratedRow]] = []

        def accept(item: Asked) -> bool:
            try:
                return self._generation_group(item) == key
            except TaskGone:
                return False

        while True:
            room = self.batch_size - len(running) - len(waiting)
            if more is not None and room > 0 and batch.open:
                waiting.extend(more(accept, room))
            joining: list[tuple[Asked, GeneratedRow]] = []
            while waiting and len(running) + len(joining) < self.batch_size and batch.open:
                item = waiting.popleft()
                row = GeneratedRow(item.watch, item.max_new_tokens, tokenizer.eos_token_id)
                row.start(torch.tensor([list(item.prompt)]))
                if row.live:
                    joining.append((item, row))
                else:  # no room for a token, or its client left before it began
                    finish(item, row.result(tokenizer))
            if not running and not joining:  # every row has ended and none waits: the batch is done
                return
            if joining:  # newcomers are prefilled: their first tokens (the others wait one forward)
                try:
                    tasks = [None if key[1] == "base" else item.task for item, _ in joining]
                    tokens = batch.join([item.prompt for item, _ in joining], tasks).tolist()
                except Exception as error:  # the batch is as it was: only the newcomers fail
                    for item, row in joining:
                        row.finish()
                        finish(item, error)
                    continue
                running += joining
                self._count(len(joining), len({item.task for item, _ in running}))
                stepped = joining
            else:
                try:
                    tokens = batch.step().tolist()
                except Exception as error:  # the batch is lost: its rows fail; those waiting go on
                    for item, row in running:
                        row.finish()
                        finish(item, error)
                    running, batch = [], JoiningBatch(model, self.pad_id)
                    continue
                stepped = running
            for (_, row), token in zip(stepped, tokens, strict=True):
                row.add(int(token))
            keep = [i for i, (_, row) in enumerate(running) if row.live]
            for item, row in running:
                if not row.live:
                    finish(item, row.result(tokenizer))
            batch.leave(keep)
            running = [running[i] for i in keep]
            if between is not None:
                between()

    def _generation_chunks(self, model: Any, asked: Sequence[Asked]) -> list[list[int]]:
        """Consecutive rows (sorted by prompt length) in chunks of at most batch_size, each chunk's longest
        prompt leaving every row of it its own max_new_tokens in the model's context (padded to the longest
        prompt, a row has that much less room than alone)."""
        chunks: list[list[int]] = []
        for j, item in enumerate(asked):
            if chunks and len(chunks[-1]) < self.batch_size:
                room = model.context_room(len(item.prompt))  # the longest so far: rows are sorted by length
                if room is None or max(asked[i].max_new_tokens for i in [*chunks[-1], j]) <= room:
                    chunks[-1].append(j)
                    continue
            chunks.append([j])
        return chunks

    def _generate_chunk(self, model: Any, kind: str, asked: Sequence[Asked], finish: Done) -> None:
        """One chunk generated whole (a prefix-tuned task, an encoder-decoder)."""
        tokenizer = self.backbone.tokenizer
        rows = [GeneratedRow(item.watch, item.max_new_tokens, tokenizer.eos_token_id) for item in asked]
        streamer = RowsStreamer(rows)
        tasks = None if kind == "base" else [item.task for item in asked]
        limits = [item.max_new_tokens for item in asked]
        try:
            model.generate_texts([item.prompt for item in asked], max(limits), self.pad_id, tasks, streamer, limits)
        except Cancelled:  # every row has ended before generate's own end: the rows' tokens are kept
            pass
        except BaseException:
            streamer.end()  # readers waiting for a next piece are released
            raise
        streamer.end()
        for item, row in zip(asked, rows, strict=True):
            finish(item, row.result(tokenizer))
        self._count(len(asked), len(set(tasks or [BASE])))

    # --- describing the run ---------------------------------------------------------------------

    def describe(self, task: str) -> dict[str, Any]:
        """A task's name, type, labels, its input (the fields, the other accepted spellings of them, and the
        JSON schema of a record: runs/predict.py's input_schema, which predict and serve both enforce) and its
        metrics."""
        data = self.tasks[task]
        kind = data.config.type
        schema = self.schemas[task]
        bounds = self.bounds[task]
        return {
            "name": task,
            "type": kind,
            "labels": data.labels if kind != "regression" else None,
            "input_fields": list(schema.fields),
            "generic_input_fields": list(schema.generic),
            "accepted_input_fields": [list(spelling) for spelling in schema.spellings],
            "optional_input_fields": list(schema.optional),
            "input_schema": schema.json_schema(),
            "prediction_range": list(bounds) if bounds is not None else None,
            "streaming": kind == "generation",
            "metrics": self.task_metrics.get(task),
            "run": self.sources.get(task),
        }


def _base_weights(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """The backbone's own weights and buffers, without any adapter's (LoRA's lora_ tensors)."""
    return {k: v for k, v in model.backbone.state_dict().items() if "lora_" not in k}


def adopt(host: MultiTaskModel, model: MultiTaskModel, task: str) -> None:
    """Task `task` of `model` answered by `host` from now on: its head moved over, its LoRA adapter copied into
    host's backbone (Engine._host decided that they fit)."""
    assert host.task_adapters is not None and model.task_adapters is not None
    host.task_adapters.adopt(host.backbone, task, model.task_adapters)
    host.heads[task] = model.heads[task]
    if isinstance(host, CausalLMMultiTask) and task in getattr(model, "generation_tasks", ()):
        host.generation_tasks = host.generation_tasks | {task}


def release(host: MultiTaskModel, task: str) -> None:
    """Undo `adopt`: task `task`'s head and adapter leave `host`."""
    assert host.task_adapters is not None
    host.task_adapters.drop(task)
    del host.heads[task]
    if isinstance(host, CausalLMMultiTask):
        host.generation_tasks = host.generation_tasks - {task}


def pretrained_model(config: Config, model: MultiTaskModel) -> CausalLMMultiTask | None:
    """`model` when it can answer as the pretrained LM itself: a (causal or seq2seq) LM whose own weights
    training left as they were (per-task adapters on a frozen backbone), so that with every adapter off it
    is the pretrained model; else None. A run with a task named BASE keeps that name for its task."""
    peft = config.model.peft
    frozen = peft is not None and not peft.train_backbone and model.task_adapters is not None
    if not isinstance(model, CausalLMMultiTask) or not frozen or BASE in config.tasks:
        return None
    return model


def no_base(config: Config) -> str:
    """Why a run serves no BASE model (the 404's explanation)."""
    if BASE in config.tasks:
        return f"'{BASE}' is a task of this run"
    if config.model.kind not in ("causal_lm", "seq2seq"):
        return "this run's backbone is not a language model"
    if config.model.peft is None or config.model.peft.train_backbone:
        return "this run trained the backbone's own weights, so the pretrained model is not part of it"
    return "this run merges a refinement into the model that would answer it"


def input_difference(mine: Any, theirs: Any) -> str | None:
    """What differs between two backbones' input processing, or None: a tokenizer's whole pipeline
    (normalizer, vocabulary, special tokens), its chat template and added tokens; an image processor's
    settings."""
    if hasattr(mine, "backend_tokenizer") and hasattr(theirs, "backend_tokenizer"):  # fast tokenizers
        if _pipeline(mine) != _pipeline(theirs):
            return "its tokenizer (vocabulary, normalizer or special tokens)"
    elif hasattr(mine, "get_vocab") and hasattr(theirs, "get_vocab"):
        if mine.get_vocab() != theirs.get_vocab():
            return "its tokenizer's vocabulary"
    elif hasattr(mine, "to_dict") and hasattr(theirs, "to_dict"):  # image processors
        return None if mine.to_dict() == theirs.to_dict() else "its image processor"
    elif type(mine) is not type(theirs):
        return "its input processor"
    if getattr(mine, "chat_template", None) != getattr(theirs, "chat_template", None):
        return "its chat template"
    if getattr(mine, "all_special_tokens", None) != getattr(theirs, "all_special_tokens", None):
        return "its special tokens"
    return None


def _pipeline(tokenizer: Any) -> dict[str, Any]:
    """A fast tokenizer's whole pipeline, less the truncation and padding state its last call left (saved
    with it, and not part of how a text becomes ids)."""
    pipeline: dict[str, Any] = json.loads(tokenizer.backend_tokenizer.to_str())
    pipeline.pop("truncation", None)
    pipeline.pop("padding", None)
    return pipeline


def padded_chunks(items: list[T], lengths: list[int], batch_size: int, slack: int = PADDING_SLACK) -> list[list[T]]:
    """Length-sorted items in batches of at most `batch_size`; a longer item starts a new batch when padding
    the batch up to it would add more than `slack` positions (one short and one long row: two forwards)."""
    chunks: list[list[T]] = []
    longest = 0
    for item, length in zip(items, lengths, strict=True):
        if chunks and len(chunks[-1]) < batch_size and len(chunks[-1]) * (length - longest) <= slack:
            chunks[-1].append(item)
        else:
            chunks.append([item])
        longest = length
    return chunks


def unknown_task(task: str, tasks: Sequence[str]) -> MultitunError:
    return MultitunError(f"no task '{task}' in this run (tasks: {', '.join(tasks)})")
