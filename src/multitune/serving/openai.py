"""OpenAI-compatible routes for the run's generation tasks, so that OpenAI's own clients (and the tools built
on them) call multitune: `model` names the task.

- GET  /v1/models             the generation tasks, as OpenAI lists models, and `base` where the run has it;
- POST /v1/chat/completions   the last user message is the task's input text (a system message, if any,
                              its instruction in place of the task's own); `stream: true` sends
                              `chat.completion.chunk` server-sent events and then `data: [DONE]`;
- POST /v1/completions        `prompt` (one string) is the task's input text; streams `text_completion` chunks.

`model: "base"` is the pretrained model itself, every task's adapter off: the whole conversation goes through
the model's chat template (a completion's prompt is continued as it is). A run has it where training left the
backbone's own weights as they were (per-task adapters on a frozen backbone: LoRA, prefix, prompt and
bottleneck adapters) and no task is called `base`; elsewhere it is a 404 saying why. Its default `max_tokens`
is the longest `max_new_tokens` of the run's generation tasks.

Generation is greedy, as everywhere in multitune (sampling settings such as `temperature` are accepted and
ignored); `max_tokens` caps the new tokens (default: the task's `max_new_tokens`; more than the model's
context leaves room for is a 422), `stop` ends the text before the first of up to four strings, and
`finish_reason` is "length" when the text was cut at the cap. A generation counts toward `--max-queue` (503
when full) and is stopped when its client leaves. A task whose input has more
than one text field is not reachable here (its own /v1/tasks/NAME/generate route takes every field). Errors are
JSON `{"detail": ...}` with the status codes of the other routes, which OpenAI's clients raise as their
`APIStatusError`s.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict

from multitune.errors import MultitunError
from multitune.serving.engine import BASE, TaskGone
from multitune.serving.generation import Generation
from multitune.serving.routes import Answering

MAX_TOKENS = 4096  # the most new tokens one request may ask for (the model's context may allow fewer)
MAX_STOPS = 4  # stop sequences per request, as OpenAI allows


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # an assistant's tool-call turn has none

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class Sampling(BaseModel):
    """What both requests share; OpenAI's other settings are accepted and ignored (generation is greedy)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Annotated[int, Strict(), Field(ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Strict(), Field(ge=1, le=MAX_TOKENS)] | None = None
    n: Annotated[int, Strict(), Field(ge=1, le=1)] = 1  # one choice per request
    stream: Annotated[bool, Strict()] | None = False
    # where to end the text (not included in it): one string or up to MAX_STOPS, as OpenAI's `stop`
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None

    def stops(self) -> list[str]:
        found = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in found if stop]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


def add_openai_routes(v1: APIRouter, answering: Answering) -> None:
    engine = answering.engine

    def listed(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "multitune"}

    def offered() -> list[str]:  # served now: tasks load and unload at run time
        return engine.generation_tasks() + ([BASE] if engine.base is not None else [])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        """The generation tasks, as OpenAI lists models (`id` is the task's name), and `base` (the pretrained
        model) where the run has it."""
        return {"object": "list", "data": [listed(name) for name in offered()]}

    @v1.get("/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        """One generation task (or `base`), as OpenAI describes a model."""
        if model not in offered():
            raise HTTPException(404, _no_model(model, offered()))
        return listed(model)

    @v1.post("/chat/completions", response_model=None)
    async def chat(request: ChatRequest, http: Request) -> Any:
        """OpenAI's chat completion: the last user message is the task's input text."""
        users = [m for m in request.messages if m.role == "user"]
        if not users:
            raise HTTPException(422, "messages: no user message to answer")
        if request.model == BASE and BASE not in engine.tasks:  # the whole conversation, as the model's chat
            turns: list[tuple[str, str]] = [(m.role, m.text()) for m in request.messages]
            return await _complete(answering, http, request, _base_row(answering, turns, None), True)
        system = [m.text() for m in request.messages if m.role in ("system", "developer")]
        row = _task_row(answering, request.model, users[-1].text(), system[-1] if system else None, "messages")
        return await _complete(answering, http, request, row, True)

    @v1.post("/completions", response_model=None)
    async def completions(request: CompletionRequest, http: Request) -> Any:
        """OpenAI's (legacy) text completion: `prompt` is the task's input text (`base`: the text to continue)."""
        if request.model == BASE and BASE not in engine.tasks:
            return await _complete(answering, http, request, _base_row(answering, None, request.prompt), False)
        row = _task_row(answering, request.model, request.prompt, None, "prompt")
        return await _complete(answering, http, request, row, False)


def _no_model(task: str, offered: list[str]) -> str:
    return f"no generation task '{task}' in this run (models: {', '.join(offered)})"


def _checked_size(answering: Answering, where: str, size: int) -> None:
    if size > answering.max_chars:
        raise HTTPException(422, f"{where}: {size} characters of text; at most {answering.max_chars} are allowed")


def _task_row(answering: Answering, task: str, text: str, instruction: str | None, where: str) -> Any:
    """The encoded row of a generation task's request: `text` its input, `instruction` in place of its own."""
    engine = answering.engine
    generative = engine.generation_tasks()  # served now: tasks load and unload at run time
    schema = engine.schemas.get(task)
    if task not in generative or schema is None:
        raise HTTPException(404, _no_model(task, generative + ([BASE] if engine.base is not None else [])))
    fields = schema.generic
    if len(fields) != 1:
        raise HTTPException(422, f"task '{task}' takes {len(fields)} texts: use /v1/tasks/{task}/generate")
    _checked_size(answering, where, len(text) + len(instruction or ""))
    record: dict[str, Any] = {fields[0]: text}
    if instruction is not None:
        record["instruction"] = instruction
    return answering.encode(task, [record], where, exact=True)[0]


def _base_row(answering: Answering, turns: list[tuple[str, str]] | None, prompt: str | None) -> Any:
    """The pretrained model's row: the whole conversation (`turns`), or a prompt to continue."""
    where = "messages" if turns is not None else "prompt"
    _checked_size(answering, where, sum(len(text) for _, text in turns) if turns is not None else len(prompt or ""))
    try:
        return answering.engine.encode_base(turns, prompt)
    except TaskGone as error:
        raise HTTPException(404, str(error)) from None
    except MultitunError as error:
        raise HTTPException(422, f"{error.field}: {error.message}") from None


async def _complete(answering: Answering, http: Request, request: Any, row: Any, chat: bool) -> Any:
    task = request.model
    asked = request.max_completion_tokens or request.max_tokens
    generation = answering.generation(task, row, http, asked, request.stops())
    reply = Reply(task, chat, generation.prompt_tokens)
    if request.stream:
        return StreamingResponse(reply.chunks(generation), media_type="text/event-stream")
    try:
        async for _ in generation.pieces():
            pass
    except TaskGone as error:  # unloaded while the request waited
        raise HTTPException(404, str(error)) from None
    if generation.gone:  # nobody reads the answer: say so in the log and metrics
        raise HTTPException(499, "the client closed the request")
    return reply.whole(generation.text, generation.tokens, generation.finish or "stop")


class Reply:
    """One answer in OpenAI's response shapes (chat or text completion, whole or as chunks)."""

    def __init__(self, task: str, chat: bool, prompt_tokens: int) -> None:
        self.task, self.chat, self.prompt_tokens = task, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.task, "choices": choices}

    def whole(self, text: str, completion_tokens: int, finish: str) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = self._choice(text, finish)
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }
        return {**self._envelope([choice], chunk=False), "usage": usage}

    async def chunks(self, generation: Generation) -> AsyncIterator[str]:
        """`data: {chunk}` events as the text comes, a last one with its finish_reason ("stop" or "length"),
        then `data: [DONE]`."""
        first = True
        try:
            async for piece in generation.pieces():
                if piece or first:
                    yield _event(self._envelope([self._choice(piece, None, first)], chunk=True))
                    first = False
        except Exception as error:  # the headers are sent: report it in the stream, as OpenAI does
            yield _event({"error": {"message": str(error) or type(error).__name__, "type": "server_error"}})
            return
        if generation.gone:
            return
        yield _event(self._envelope([self._choice(None, generation.finish or "stop", first)], chunk=True))
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
