"""OpenAI-compatible routes for the run's generation tasks, so that OpenAI's own clients (and the tools built
on them) call multitune: `model` names the task.

- GET  /v1/models             the generation tasks, as OpenAI lists models;
- POST /v1/chat/completions   the last user message is the task's input text (a system message, if any,
                              its instruction in place of the task's own); `stream: true` sends
                              `chat.completion.chunk` server-sent events and then `data: [DONE]`;
- POST /v1/completions        `prompt` (one string) is the task's input text; streams `text_completion` chunks.

Generation is greedy, as everywhere in multitune (sampling settings such as `temperature` are accepted and
ignored); `max_tokens` caps the new tokens (default: the task's `max_new_tokens`). A task whose input has more
than one text field is not reachable here (its own /v1/tasks/NAME/generate route takes every field). Errors are
JSON `{"detail": ...}` with the status codes of the other routes, which OpenAI's clients raise as their
`APIStatusError`s.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from multitune.serving.batcher import Busy
from multitune.serving.engine import TaskGone
from multitune.serving.routes import Answering

MAX_TOKENS = 4096  # the most new tokens one request may ask for


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class Sampling(BaseModel):
    """What both requests share; OpenAI's other settings are accepted and ignored (generation is greedy)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


def add_openai_routes(v1: APIRouter, answering: Answering) -> None:
    engine = answering.engine

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        """The generation tasks, as OpenAI lists models (`id` is the task's name)."""
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "multitune"}
                for name in engine.generation_tasks()
            ],
        }

    @v1.post("/chat/completions", response_model=None)
    async def chat(request: ChatRequest) -> Any:
        """OpenAI's chat completion: the last user message is the task's input text."""
        users = [m for m in request.messages if m.role == "user"]
        if not users:
            raise HTTPException(422, "messages: no user message to answer")
        system = [m.text() for m in request.messages if m.role in ("system", "developer")]
        return await _complete(answering, request, users[-1].text(), system[-1] if system else None, True)

    @v1.post("/completions", response_model=None)
    async def completions(request: CompletionRequest) -> Any:
        """OpenAI's (legacy) text completion: `prompt` is the task's input text."""
        return await _complete(answering, request, request.prompt, None, False)


async def _complete(answering: Answering, request: Any, text: str, instruction: str | None, chat: bool) -> Any:
    engine, task = answering.engine, request.model
    generative = engine.generation_tasks()  # served now: tasks load and unload at run time
    schema = engine.schemas.get(task)
    if task not in generative or schema is None:
        raise HTTPException(404, f"no generation task '{task}' in this run (models: {', '.join(generative)})")
    fields = schema.generic
    if len(fields) != 1:
        raise HTTPException(422, f"task '{task}' takes {len(fields)} texts: use /v1/tasks/{task}/generate")
    record: dict[str, Any] = {fields[0]: text}
    if instruction is not None:
        record["instruction"] = instruction
    rows = answering.encode(task, [record], "messages" if chat else "prompt")
    limit = request.max_completion_tokens or request.max_tokens
    reply = Reply(task, chat, len(rows[0].input_ids[: rows[0].prompt_length or None]))
    if not request.stream:
        try:
            text = await answering.batcher.call(engine.generate_one, task, rows[0], None, limit)
        except Busy as error:
            raise HTTPException(503, str(error), {"Retry-After": "1"}) from None
        except TaskGone as error:  # unloaded while the request waited
            raise HTTPException(404, str(error)) from None
        return reply.whole(text, len(engine.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]))
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(engine.backbone.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        done = answering.batcher.call(engine.generate_one, task, rows[0], streamer, limit)
    except Busy as error:
        raise HTTPException(503, str(error), {"Retry-After": "1"}) from None
    return StreamingResponse(reply.chunks(streamer, done), media_type="text/event-stream")


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

    def whole(self, text: str, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        else:
            choice = self._choice(text, "stop")
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }
        return {**self._envelope([choice], chunk=False), "usage": usage}

    async def chunks(self, streamer: Any, done: Any) -> AsyncIterator[str]:
        """`data: {chunk}` events as the text comes, a last one with finish_reason "stop", then `data: [DONE]`."""
        import asyncio

        loop = asyncio.get_running_loop()
        first = True
        while True:
            piece = await loop.run_in_executor(None, next, streamer, None)
            if piece is None:
                break
            if piece or first:
                yield _event(self._envelope([self._choice(piece, None, first)], chunk=True))
                first = False
        try:
            await done
        except Exception as error:  # the headers are sent: report it in the stream, as OpenAI does
            yield _event({"error": {"message": str(error) or type(error).__name__, "type": "server_error"}})
            return
        yield _event(self._envelope([self._choice(None, "stop", first)], chunk=True))
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
