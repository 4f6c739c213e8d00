"""`multitune serve RUN_DIR`: one HTTP JSON API for every task of a run, on one shared backbone.

Routes (all JSON; the OpenAPI schema is at /openapi.json, and /docs shows it as a page that needs no network):
- GET  /healthz                        liveness, queue depth and batching counters (never needs a token)
- GET  /v1/tasks                       each task's name, type, labels, input fields and metrics
- POST /v1/tasks/{task}/predict        {"inputs": [record, ...]} or {"input": record}
- POST /v1/predict                     {"inputs": [{"task": name, "input": record}, ...]}: several tasks at once
- POST /v1/tasks/{task}/generate       {"input": record, "stream": true} streams server-sent events

A record holds what its task's schema says (run.input_schema: the task's own text fields or the generic
`text`/`text_pair`/`tokens`), checked by the same function as in `multitune predict` (run.checked_input), and
gets the same answer (a token record longer than the model's max_length is tagged in sliding windows, every
word of it; a regression answer is held to the training range, `raw` beside it). Each task also has its own
`/v1/tasks/NAME/predict` route, so that the OpenAPI document shows its request schema. Every error, of every
route and of the HTTP layer itself, is JSON: {"detail": "one line"}: 400 for a request that is not HTTP, 401
without the bearer token (when one is set), 404 for an unknown path or an unknown task in the path (one named
in /v1/predict's body is a 422: the body is wrong), 405 for a wrong method, 408 when the request headers or
body do not arrive in time, 413 for a body over the limit, 415 for a body that is not declared JSON, 422 for
a bad body (not UTF-8, not JSON, not an object, text that is not text such as a lone UTF-16 surrogate) or
record, 500 for a fault of the server itself, 503 when the queue is full or too many connections are open.
"""

# no `from __future__ import annotations`: FastAPI reads the request models defined in create_app at runtime
import asyncio
import hmac
import json
import math
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any

from multitune.errors import ConfigError, MultitunError
from multitune.serving.batcher import Busy, MicroBatcher
from multitune.serving.engine import Engine

TOKEN_VARIABLE = "MULTITUNE_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005)

# one input record: any JSON object here; run.checked_input, shared with `multitune predict`, checks it against
# its task's schema (run.input_schema), which the OpenAPI document shows per task route
Record = dict[str, Any]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class ServeSettings:
    """Limits and batching of the server (the `multitune serve` options)."""

    token: str | None = None  # when set, every /v1 route needs `Authorization: Bearer <token>`
    max_inputs: int = 64  # records per request
    max_chars: int = 10_000  # characters of text per record
    max_body_bytes: int = 2_000_000
    max_batch_rows: int = 64  # rows the batcher gathers for one Engine.run
    max_wait_ms: float = 5.0  # how long a lone request waits for company
    max_queue: int = 512  # requests waiting; more are refused with 503
    threads: int | None = None  # torch's CPU threads for inference (default: torch's own choice)
    # slow clients: a connection must deliver a request's headers within header_timeout seconds (of opening,
    # or of its first byte after a keep-alive wait) and its body within body_timeout seconds of the headers,
    # else it gets a 408 and is closed; connections beyond max_connections get a 503 and are closed
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    keep_alive: int = 30  # seconds an idle connection is kept open between requests

    def __post_init__(self) -> None:
        """A bound that is zero, negative or not finite is no bound (or refuses everything): refused by its
        `multitune serve` option."""
        at_least = {"max_wait_ms": 0.0}
        for name in (
            "max_inputs",
            "max_chars",
            "max_body_bytes",
            "max_batch_rows",
            "max_wait_ms",
            "max_queue",
            "threads",
            "header_timeout",
            "body_timeout",
            "max_connections",
            "keep_alive",
        ):
            value = getattr(self, name)
            if value is None and name == "threads":
                continue
            floor = at_least.get(name)
            fine = math.isfinite(value) and (value >= floor if floor is not None else value > 0)
            if not fine:
                need = "at least 0" if floor is not None else "above 0"
                raise ConfigError(f"must be a finite number {need}, not {value}", field="--" + name.replace("_", "-"))


JSON_BODY_METHODS = ("POST", "PUT", "PATCH")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a lone surrogate can get into a UTF-8 body
SURROGATE = re.compile("[\ud800-\udfff]")


class RequestGuard:
    """ASGI middleware in front of every route: reads the whole body within `body_timeout` seconds (else 408)
    and at most `limit` bytes (else 413), and refuses a body the routes could not read as text: not declared
    JSON (415), not UTF-8, not JSON, not an object, nested past the parser or holding a lone UTF-16
    surrogate (422). The routes then only ever see valid text; every refusal is JSON."""

    def __init__(self, app: Any, limit: int, body_timeout: float = 30.0) -> None:
        self.app, self.limit, self.body_timeout = app, limit, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await refuse(send, 413, f"request body over {self.limit} bytes", close=True)
            return
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                detail = f"request body not received within {self.body_timeout:g} s"
                await refuse(send, 408, detail, close=True)
                return
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await refuse(send, 413, f"request body over {self.limit} bytes", close=True)
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body and scope.get("method") in JSON_BODY_METHODS:
            problem = json_problem(headers.get(b"content-type", b"").decode("latin-1"), body)
            if problem is not None:
                await refuse(send, *problem)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def json_problem(content_type: str, body: bytes) -> tuple[int, str] | None:
    """Why `body` is not a JSON object of valid text, as (status, one line); None when it is."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        got = f"'{media[:80]}'" if media else "no content type"
        return 415, f"send the body as JSON with 'Content-Type: application/json' (got {got})"
    charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", parameters, re.IGNORECASE)
    if charset and charset.group(1).lower().replace("_", "-") not in ("utf-8", "utf8"):
        return 415, f"a JSON body is UTF-8 text, not {charset.group(1)[:40]}"
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        return 422, f"body: not UTF-8 text (byte 0x{body[error.start]:02x} at offset {error.start})"
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique)
    except json.JSONDecodeError as error:
        return 422, f"body: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    except RecursionError:
        return 422, "body: not valid JSON here: nested too deeply"
    except ValueError as error:
        return 422, f"body: not valid JSON: {error}"
    if not isinstance(value, dict):
        return 422, f"body: a JSON object is expected, not {_json_kind(value)}"
    if SURROGATE_ESCAPE.search(body):
        where = lone_surrogate(value)
        if where is not None:
            return 422, f"{where}: holds a lone UTF-16 surrogate, which is not text (send characters as UTF-8)"
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object without repeated keys: JSON parsers disagree on which of two values wins, so none does."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {json.dumps(key)[:60]} appears twice in one object")
            seen.add(key)
    return value


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def lone_surrogate(value: Any) -> str | None:
    """Where in `value` (a parsed JSON document) a key or string holds a lone surrogate: `inputs.0.input.text`."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, inner in item.items():
                place = f"{where}.{key}" if where else key
                if SURROGATE.search(key):
                    return f"{where or 'body'} (a key)"
                stack.append((place, inner))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), inner) for i, inner in enumerate(item))
    return None


def error_body(status: int, detail: str, close: bool = False) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the request is not read: the connection cannot carry another one
        headers.append((b"connection", b"close"))
    return body, headers


async def refuse(send: Send, status: int, detail: str, close: bool = False) -> None:
    body, headers = error_body(status, detail, close)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw_response(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 error response with a JSON body, for the connection layer (no request to answer)."""
    body, headers = error_body(status, detail, close=True)
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


def create_app(engine: Engine, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app answering `engine`'s tasks through a micro-batcher."""
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, field_validator, model_validator

    settings = settings or ServeSettings()
    limits = settings
    batcher = MicroBatcher(engine, settings.max_batch_rows, settings.max_wait_ms, settings.max_queue)

    def checked(record: dict[str, Any]) -> dict[str, Any]:
        size = sum(
            len(item)
            for value in record.values()
            for item in (value if isinstance(value, list) else [value])
            if isinstance(item, str)
        )
        if size > limits.max_chars:
            raise ValueError(f"an input holds {size} characters of text; at most {limits.max_chars} are allowed")
        return record

    def shown_as(schemas: list[dict[str, Any]]) -> Any:
        """A record type whose OpenAPI schema is that of its task(s); it is checked by run.checked_input."""
        return Annotated[Record, WithJsonSchema(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})]

    every_record = shown_as([engine.schemas[name].json_schema() for name in engine.tasks])

    class TaskPredictRequest(BaseModel):
        """Inputs of one task: a list of records, or one record."""

        model_config = ConfigDict(extra="forbid")
        inputs: list[every_record] | None = Field(  # type: ignore[valid-type]
            None, min_length=1, max_length=limits.max_inputs
        )
        input: every_record | None = None  # type: ignore[valid-type]

        @field_validator("inputs")
        @classmethod
        def _sizes(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
            return None if value is None else [checked(v) for v in value]

        @field_validator("input")
        @classmethod
        def _size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if value is None else checked(value)

        @model_validator(mode="after")
        def _one_of(self) -> "TaskPredictRequest":
            if (self.inputs is None) == (self.input is None):
                raise ValueError("give either 'inputs' (a list of records) or 'input' (one record)")
            return self

        def records(self) -> list[dict[str, Any]]:
            return self.inputs if self.inputs is not None else [self.input or {}]

    class TaskInput(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: str
        input: Record

        @field_validator("input")
        @classmethod
        def _size(cls, value: dict[str, Any]) -> dict[str, Any]:
            return checked(value)

    each_task_input = {  # /v1/predict's items as the OpenAPI document shows them: one shape per task
        "oneOf": [
            {
                "type": "object",
                "properties": {"task": {"const": name}, "input": engine.schemas[name].json_schema()},
                "required": ["task", "input"],
                "additionalProperties": False,
            }
            for name in engine.tasks
        ]
    }

    class MixedPredictRequest(BaseModel):
        """Inputs of several tasks, each naming its task; answered in the same order."""

        model_config = ConfigDict(extra="forbid")
        inputs: list[Annotated[TaskInput, WithJsonSchema(each_task_input)]] = Field(
            min_length=1, max_length=limits.max_inputs
        )

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        input: every_record  # type: ignore[valid-type]
        stream: bool = False

        @field_validator("input")
        @classmethod
        def _size(cls, value: dict[str, Any]) -> dict[str, Any]:
            return checked(value)

    def request_models(name: str) -> tuple[type[BaseModel], type[BaseModel]]:
        """The predict and generate bodies of one task's own routes: the same checks, its record schema."""
        record = shown_as([engine.schemas[name].json_schema()])
        stem = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name) if part)
        predict_body = create_model(
            f"{stem}PredictRequest",
            __base__=TaskPredictRequest,
            inputs=(list[record] | None, Field(None, min_length=1, max_length=limits.max_inputs)),  # type: ignore[valid-type]
            input=(record | None, None),
        )
        generate_body = create_model(f"{stem}GenerateRequest", __base__=GenerateRequest, input=(record, ...))
        return predict_body, generate_body

    class Prediction(BaseModel):
        model_config = ConfigDict(extra="allow")
        prediction: Any
        probabilities: dict[str, float] | None = None

    class TaskPredictResponse(BaseModel):
        task: str
        predictions: list[Prediction]

    class MixedPrediction(Prediction):
        task: str

    class MixedPredictResponse(BaseModel):
        predictions: list[MixedPrediction]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="multitune",
        summary=f"Every task of {engine.run_dir.name} on one shared backbone",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: blank offline; /docs is served below
        redoc_url=None,
    )
    app.state.engine, app.state.batcher = engine, batcher

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        """The API's routes, request bodies and answers, from the OpenAPI schema, in one page with no assets."""
        from fastapi.responses import HTMLResponse

        return HTMLResponse(docs_page(app.openapi()))

    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        # compared as the bytes that were sent (headers arrive decoded as latin-1) and as the bytes that were set
        expected = settings.token.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given.encode("latin-1"), expected):
            detail = "missing bearer token" if credentials is None else "wrong bearer token"
            raise HTTPException(401, f"{detail}: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return JSONResponse({"detail": f"{where}: {message}{more}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _fault(request: Request, error: Exception) -> JSONResponse:
        """A fault of the server, not of the request: JSON like every other error (the log has the traceback)."""
        detail = f"internal error ({type(error).__name__}); the server log has the details"
        return JSONResponse({"detail": detail}, status_code=500)

    def task_or_404(task: str) -> str:
        if task not in engine.tasks:
            raise HTTPException(404, str(_unknown(task, engine)))
        return task

    def encode(task: str, records: list[dict[str, Any]], where: str = "inputs") -> Any:
        try:
            return engine.encode(task, records)
        except MultitunError as error:
            raise HTTPException(422, _one_line(error, where)) from None

    async def answer(parts: list[Any]) -> list[list[dict[str, Any]]]:
        try:
            return await batcher.submit(parts)
        except Busy as error:
            raise HTTPException(503, str(error), {"Retry-After": "1"}) from None

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the server is up and its model loaded; queue depth and batching counters."""
        stats = engine.stats
        return {
            "status": "ok",
            "tasks": len(engine.tasks),
            "queue": batcher.depth,
            "batches": stats.batches,
            "rows": stats.rows,
            "tasks_per_batch": stats.tasks_per_batch,
        }

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/tasks")
    async def tasks() -> dict[str, Any]:
        """Every task of the run: name, type, labels, accepted input fields, metrics."""
        config = engine.config
        return {
            "run": engine.run_dir.name,
            "backbone": config.model.backbone,
            "kind": config.model.kind,
            "tasks": [engine.describe(name) for name in engine.tasks],
        }

    async def predict_one_task(task: str, request: TaskPredictRequest) -> dict[str, Any]:
        rows = encode(task, request.records(), "inputs" if request.inputs is not None else "input")
        [predictions] = await answer([(task, rows)])
        return {"task": task, "predictions": predictions}

    def own_routes(name: str) -> None:
        """`/v1/tasks/NAME/predict` (and `/generate` for a generation task) with the task's own request
        schema in the OpenAPI document; they answer exactly as the `{task}` routes below."""
        schema = engine.schemas[name]
        predict_body, generate_body = request_models(name)

        async def predict_route(request: predict_body) -> dict[str, Any]:  # type: ignore[valid-type]
            return await predict_one_task(name, request)  # type: ignore[arg-type]

        v1.add_api_route(
            f"/tasks/{name}/predict",
            predict_route,
            methods=["POST"],
            response_model=TaskPredictResponse,
            response_model_exclude_none=True,
            summary=f"Predict {name}",
            description=f"Predictions for task '{name}' ({schema.type}); a record holds {schema.describe()}.",
        )
        if engine.is_generative(name):

            async def generate_route(request: generate_body) -> Any:  # type: ignore[valid-type]
                return await generate_one(name, request)  # type: ignore[arg-type]

            v1.add_api_route(
                f"/tasks/{name}/generate",
                generate_route,
                methods=["POST"],
                response_model=None,
                summary=f"Generate {name}",
                description=f"Task '{name}''s text for one input ({schema.describe()}); `stream: true` for events.",
            )

    for name in engine.tasks:  # before the `{task}` routes, which would match the same paths
        own_routes(name)

    @v1.post("/tasks/{task}/predict", response_model=TaskPredictResponse, response_model_exclude_none=True)
    async def predict_task(task: str, request: TaskPredictRequest) -> dict[str, Any]:
        """Predictions for one task's inputs, as `multitune predict` gives them."""
        return await predict_one_task(task_or_404(task), request)

    @v1.post("/predict", response_model=MixedPredictResponse, response_model_exclude_none=True)
    async def predict_mixed(request: MixedPredictRequest) -> dict[str, Any]:
        """Predictions for inputs of several tasks, batched together through the shared backbone."""
        by_task: dict[str, list[int]] = {}
        for i, item in enumerate(request.inputs):
            if item.task not in engine.tasks:
                raise HTTPException(422, f"inputs.{i}.task: {_unknown(item.task, engine)}")
            by_task.setdefault(item.task, []).append(i)
        parts = []
        for task, indices in by_task.items():
            try:
                parts.append((task, engine.encode(task, [request.inputs[i].input for i in indices])))
            except MultitunError as error:  # name the input by its place in the request
                place = re.fullmatch(r"inputs\[(\d+)\]", error.file or "")
                where = f"inputs.{indices[int(place.group(1))]}.input" if place else "inputs"
                raise HTTPException(422, _one_line(error, where, exact=True)) from None
        answers = await answer(parts)
        out: list[dict[str, Any]] = [{} for _ in request.inputs]
        for (task, indices), predictions in zip(by_task.items(), answers, strict=True):
            for i, prediction in zip(indices, predictions, strict=True):
                out[i] = {"task": task, **prediction}
        return {"predictions": out}

    @v1.post("/tasks/{task}/generate", response_model=None)
    async def generate(task: str, request: GenerateRequest) -> Any:
        """A generation task's text for one input; with `stream: true`, server-sent events: `token` events
        with each new piece of text, then one `done` event with the whole prediction."""
        return await generate_one(task_or_404(task), request)

    async def generate_one(task: str, request: GenerateRequest) -> Any:
        if not engine.is_generative(task):
            kind = engine.tasks[task].config.type
            raise HTTPException(
                422, f"task '{task}' is a {kind} task, not a generation task: use /v1/tasks/{task}/predict"
            )
        rows = encode(task, [request.input], "input")
        if not request.stream:
            [[prediction]] = await answer([(task, rows)])
            return {"task": task, **prediction}
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(engine.backbone.tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            done = batcher.call(engine.generate_one, task, rows[0], streamer)
        except Busy as error:
            raise HTTPException(503, str(error), {"Retry-After": "1"}) from None
        return StreamingResponse(_events(streamer, done), media_type="text/event-stream")

    app.include_router(v1)
    app.add_middleware(RequestGuard, limit=settings.max_body_bytes, body_timeout=settings.body_timeout)
    return app


async def _events(streamer: Any, done: Any) -> AsyncIterator[str]:
    """Server-sent events from a TextIteratorStreamer fed on the inference thread."""
    import asyncio

    loop = asyncio.get_running_loop()
    while True:
        piece = await loop.run_in_executor(None, next, streamer, None)
        if piece is None:
            break
        if piece:
            yield f"event: token\ndata: {json.dumps({'token': piece}, ensure_ascii=False)}\n\n"
    try:
        text = await done
    except Exception as error:  # the headers are sent: report it in the stream
        yield f"event: error\ndata: {json.dumps({'detail': str(error) or type(error).__name__})}\n\n"
        return
    yield f"event: done\ndata: {json.dumps({'prediction': text}, ensure_ascii=False)}\n\n"


def _unknown(task: str, engine: Engine) -> str:
    return f"no task '{task}' in this run (tasks: {', '.join(engine.tasks)})"


def _one_line(error: MultitunError, where: str, exact: bool = False) -> str:
    """A record's error as one line: `inputs[2]: field 'text': missing` (no line numbers: it is a request);
    `exact`: `where` names the record itself."""
    origin = error.file if error.file and error.file.startswith("inputs[") else where
    if where == "input" or exact:
        origin = where
    field = f" field '{error.field}':" if error.field else ""
    return f"{origin}:{field} {' '.join(error.message.split())}"


def guarded_protocol(settings: ServeSettings) -> type[asyncio.Protocol]:
    """uvicorn's h11 connection with the bounds uvicorn lacks: the request headers must arrive within
    `header_timeout` seconds (uvicorn waits forever for a request that never completes, so half-open and
    trickling connections pile up), at most `max_connections` are open, and its own 400 for a request that
    is not HTTP is JSON like every other error. The request body's bound is RequestGuard's."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                detail = f"the server has {settings.max_connections} connections open; retry shortly"
                self._close_with(503, detail)
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._close_with(400, "not a valid HTTP request")

        def _watch_headers(self) -> None:
            """Start the clock while a request's headers are awaited (the first time only: trickling bytes do
            not restart it); stop it once they are in."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.header_timer is None:
                self.header_timer = self.loop.call_later(settings.header_timeout, self._headers_late)
            elif not waiting:
                self._stop_header_timer()

        def _stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._close_with(408, f"request headers not received within {settings.header_timeout:g} s")

        def _close_with(self, status: int, detail: str) -> None:
            self._stop_header_timer()
            self._unset_keepalive_if_required()
            if not self.transport.is_closing():
                self.transport.write(raw_response(status, detail))
                self.transport.close()

    return GuardedH11Protocol


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None) -> None:
    """Load the run, then serve it with uvicorn until interrupted."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MultitunError(f"multitune serve needs {' and '.join(missing)}: pip install 'multitune[serve]'")
    import uvicorn

    settings = settings or ServeSettings()
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)  # on a busy CPU, fewer threads than cores can be much faster
    engine = Engine(run_dir)
    if host not in LOOPBACK and settings.token is None:
        print(
            f"multitune: warning: serving on {host} without a token: anyone who can reach it may call it",
            file=sys.stderr,
        )
    app = create_app(engine, settings)
    print(
        f"multitune: serving {len(engine.tasks)} tasks ({', '.join(engine.tasks)}) of {run_dir} on http://{host}:{port}"
        f" (docs: /docs{', bearer token required' if settings.token else ''})",
        file=sys.stderr,
        flush=True,
    )
    # the inference thread runs Python between torch ops: a short GIL switch interval keeps the event loop
    # (parsing, validating, queueing the next requests) responsive while a batch runs
    sys.setswitchinterval(SWITCH_INTERVAL)
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=guarded_protocol(settings),
        log_level="warning",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive,
    )


# --- /docs: the OpenAPI schema as one self-contained page --------------------------------------------


def docs_page(schema: dict[str, Any]) -> str:
    """Every route with its summary, request body schema and answers, as plain HTML: it needs no script or
    stylesheet from elsewhere, so it shows offline (FastAPI's Swagger UI and ReDoc load theirs from a CDN)."""
    import html

    components = schema.get("components", {}).get("schemas", {})

    def resolved(node: Any, seen: frozenset[str] = frozenset()) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                return {"$ref": name} if name in seen else resolved(components.get(name, {}), seen | {name})
            return {key: resolved(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [resolved(value, seen) for value in node]
        return node

    info = schema.get("info", {})
    parts = [
        f"<h1>{html.escape(str(info.get('title', 'API')))} {html.escape(str(info.get('version', '')))}</h1>",
        f"<p>{html.escape(str(info.get('summary') or info.get('description') or ''))}</p>",
        '<p>The machine-readable schema: <a href="openapi.json">openapi.json</a>.</p>',
    ]
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            title = f"{method.upper()} {path}"
            parts.append(f'<h2 id="{html.escape(title)}"><code>{html.escape(title)}</code></h2>')
            text = operation.get("description") or operation.get("summary") or ""
            parts.append(f"<p>{html.escape(text)}</p>")
            body = operation.get("requestBody", {}).get("content", {})
            for kind, content in body.items():
                shown = json.dumps(resolved(content.get("schema", {})), indent=2)
                parts.append(f"<p>Request body ({html.escape(kind)}):</p><pre>{html.escape(shown)}</pre>")
            answers = operation.get("responses", {})
            if answers:
                items = "".join(
                    f"<li>{html.escape(str(code))}: {html.escape(str(answer.get('description', '')))}</li>"
                    for code, answer in answers.items()
                )
                parts.append(f"<p>Answers:</p><ul>{items}</ul>")
    style = "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}pre{background:#f6f6f6;padding:8px}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(str(info.get("title")))}'
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
