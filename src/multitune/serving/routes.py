"""The routes of the HTTP API, one group per function: health, the /v1 task list, each task's own routes,
predict and generate; JSON for every error (the bearer token is checked in front of them: guards.py). What the routes
share (a task by name, a record encoded, an answer from the batcher) is Answering's."""

# no `from __future__ import annotations`: FastAPI reads the routes' parameter annotations at runtime
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer

from multitune.errors import MultitunError
from multitune.serving.batcher import Busy, MicroBatcher
from multitune.serving.engine import UNLOADED, Engine, TaskGone
from multitune.serving.generation import Generation
from multitune.serving.schemas import (
    GenerateBody,
    MixedBody,
    MixedPredictResponse,
    PredictBody,
    Record,
    RequestModels,
    TaskPredictResponse,
)


def lifespan(batcher: MicroBatcher) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The batcher's worker runs while the app does."""

    @asynccontextmanager
    async def running(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    return running


def bearer() -> Any:
    """The dependency that shows the bearer-token scheme in the OpenAPI document. It checks nothing: the token
    is RequestGuard's (serving/guards.py Access), before the body is read."""
    return Depends(HTTPBearer(auto_error=False))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_fault)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body the models refuse, as one line naming its first problem: `inputs.0.text: ...`."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return JSONResponse({"detail": f"{where}: {message}{more}"}, status_code=422)


async def server_fault(request: Request, error: Exception) -> JSONResponse:
    """A fault of the server, not of the request: JSON like every other error (the log has the traceback)."""
    detail = f"internal error ({type(error).__name__}); the server log has the details"
    return JSONResponse({"detail": detail}, status_code=500)


def add_health(app: FastAPI, engine: Engine, batcher: MicroBatcher) -> None:
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


def add_metrics(app: FastAPI, metrics: Any) -> None:
    from fastapi.responses import Response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Request counts by route and status, latency and batch histograms, queue depth (Prometheus text)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def add_tasks(v1: APIRouter, engine: Engine) -> None:
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


class Answering:
    """What every predict and generate route does: find the task, encode its records (a bad one is a 422
    naming it), and queue them on the batcher (a full queue is a 503)."""

    def __init__(self, engine: Engine, batcher: MicroBatcher, max_chars: int = 10_000) -> None:
        self.engine, self.batcher, self.max_chars = engine, batcher, max_chars

    def task_or_404(self, task: str) -> str:
        if task not in self.engine.tasks:
            raise HTTPException(404, str(_unknown(task, self.engine)))
        return task

    def encode(self, task: str, records: list[Record], where: str = "inputs", exact: bool = False) -> Any:
        """`exact`: a bad record is named `where` itself (a request whose text is not a list of inputs)."""
        try:
            return self.engine.encode(task, records)
        except TaskGone as error:
            raise HTTPException(404, str(error)) from None
        except MultitunError as error:
            raise HTTPException(422, _one_line(error, where, exact)) from None

    async def answer(self, parts: list[Any]) -> list[list[dict[str, Any]]]:
        try:
            answers = await self.batcher.submit(parts)
        except Busy as error:
            raise busy(error) from None
        for (task, _), answer in zip(parts, answers, strict=True):
            if answer is UNLOADED:
                raise HTTPException(404, f"task '{task}' was unloaded while the request waited")
        return answers

    async def predict(self, task: str, request: PredictBody) -> dict[str, Any]:
        rows = self.encode(task, request.records(), "inputs" if request.inputs is not None else "input")
        [predictions] = await self.answer([(task, rows)])
        return {"task": task, "predictions": predictions}

    async def predict_mixed(self, request: MixedBody) -> dict[str, Any]:
        """Each task's records encoded together, all of them answered in one submission, in request order."""
        by_task: dict[str, list[int]] = {}
        for i, item in enumerate(request.inputs):
            if item.task not in self.engine.tasks:
                raise HTTPException(422, f"inputs.{i}.task: {_unknown(item.task, self.engine)}")
            by_task.setdefault(item.task, []).append(i)
        parts = []
        for task, indices in by_task.items():
            try:
                parts.append((task, self.engine.encode(task, [request.inputs[i].input for i in indices])))
            except MultitunError as error:  # name the input by its place in the request
                place = re.fullmatch(r"inputs\[(\d+)\]", error.file or "")
                where = f"inputs.{indices[int(place.group(1))]}.input" if place else "inputs"
                raise HTTPException(422, _one_line(error, where, exact=True)) from None
        answers = await self.answer(parts)
        out: list[dict[str, Any]] = [{} for _ in request.inputs]
        for (task, indices), predictions in zip(by_task.items(), answers, strict=True):
            for i, prediction in zip(indices, predictions, strict=True):
                out[i] = {"task": task, **prediction}
        return {"predictions": out}

    async def generate(self, task: str, request: GenerateBody, http: Request) -> Any:
        if not self.engine.is_generative(task):
            data = self.engine.tasks.get(task)
            if data is None:
                raise HTTPException(404, _unknown(task, self.engine))
            kind = data.config.type
            raise HTTPException(
                422, f"task '{task}' is a {kind} task, not a generation task: use /v1/tasks/{task}/predict"
            )
        rows = self.encode(task, [request.input], "input")
        if not request.stream:
            [[prediction]] = await self.answer([(task, rows)])
            return {"task": task, **prediction}
        return StreamingResponse(_events(self.generation(task, rows[0], http)), media_type="text/event-stream")

    def generation(self, task: str, row: Any, http: Request, asked: int | None = None, stops: Any = ()) -> Generation:
        """One generation of `task` for `row`, queued on the inference thread: 404 for a task gone, 422 for a
        max_tokens past the model's context, 503 when the queue is full."""
        try:
            return Generation(self.engine, self.batcher, task, row, http, asked, stops)
        except TaskGone as error:
            raise HTTPException(404, str(error)) from None
        except MultitunError as error:
            raise HTTPException(422, f"{error.field}: {error.message}") from None
        except Busy as error:
            raise busy(error) from None


def add_own_routes(v1: APIRouter, name: str, answering: Answering, models: RequestModels) -> None:
    """`/v1/tasks/NAME/predict` (and `/generate` for a generation task) with the task's own request schema in
    the OpenAPI document; they answer exactly as the `{task}` routes, and must come before them (the `{task}`
    routes would match the same paths)."""
    schema = answering.engine.schemas[name]
    predict_body, generate_body = models.own(name)

    async def predict_route(request: predict_body) -> dict[str, Any]:  # type: ignore[valid-type]
        return await answering.predict(answering.task_or_404(name), request)  # type: ignore[arg-type]

    v1.add_api_route(
        f"/tasks/{name}/predict",
        predict_route,
        methods=["POST"],
        response_model=TaskPredictResponse,
        response_model_exclude_none=True,
        summary=f"Predict {name}",
        description=f"Predictions for task '{name}' ({schema.type}); a record holds {schema.describe()}.",
    )
    if answering.engine.is_generative(name):

        async def generate_route(request: generate_body, http: Request) -> Any:  # type: ignore[valid-type]
            return await answering.generate(answering.task_or_404(name), request, http)  # type: ignore[arg-type]

        v1.add_api_route(
            f"/tasks/{name}/generate",
            generate_route,
            methods=["POST"],
            response_model=None,
            summary=f"Generate {name}",
            description=f"Task '{name}''s text for one input ({schema.describe()}); `stream: true` for events.",
        )


def add_predict_routes(v1: APIRouter, answering: Answering, models: RequestModels) -> None:
    task_predict_request, mixed_predict_request = models.task_predict, models.mixed_predict

    @v1.post("/tasks/{task}/predict", response_model=TaskPredictResponse, response_model_exclude_none=True)
    async def predict_task(task: str, request: task_predict_request) -> dict[str, Any]:  # type: ignore[valid-type]
        """Predictions for one task's inputs, as `multitune predict` gives them."""
        return await answering.predict(answering.task_or_404(task), request)  # type: ignore[arg-type]

    @v1.post("/predict", response_model=MixedPredictResponse, response_model_exclude_none=True)
    async def predict_mixed(request: mixed_predict_request) -> dict[str, Any]:  # type: ignore[valid-type]
        """Predictions for inputs of several tasks, batched together through the shared backbone."""
        return await answering.predict_mixed(request)  # type: ignore[arg-type]


def add_generate_route(v1: APIRouter, answering: Answering, models: RequestModels) -> None:
    generate_request = models.generate

    @v1.post("/tasks/{task}/generate", response_model=None)
    async def generate(task: str, request: generate_request, http: Request) -> Any:  # type: ignore[valid-type]
        """A generation task's text for one input; with `stream: true`, server-sent events: `token` events
        with each new piece of text, then one `done` event with the whole prediction."""
        return await answering.generate(answering.task_or_404(task), request, http)  # type: ignore[arg-type]


def add_admin_routes(app: FastAPI, answering: Answering, models: RequestModels) -> None:
    """/v1/admin/tasks: list, load and unload tasks while the server runs, behind their own bearer token. A task
    is loaded from another finished run of the same backbone (its head and LoRA adapter joining a served model
    where they fit, Engine._host; else its own model, its refined copy for a two-stage run): the weights are
    read off the inference thread, and the task is registered, or removed,
    on it between two batches, so no request in flight sees a half-loaded task."""
    import asyncio

    from pydantic import BaseModel, ConfigDict

    engine, batcher = answering.engine, answering.batcher

    routed = set(engine.tasks)  # tasks with their own routes (an unloaded task's answer 404 and are not shown)

    def document(task: str, served: bool) -> None:
        """The OpenAPI document follows: a loaded task gets its own routes (once), and served_openapi leaves
        out those of tasks not served."""
        if served and task not in routed:
            router = APIRouter(prefix="/v1", dependencies=[bearer()])
            add_own_routes(router, task, answering, models)
            app.include_router(router)
            routed.add(task)
        app.openapi_schema = None  # rebuilt at the next request for it

    class LoadBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        run: str  # a finished run's directory, on the server's file system
        task: str  # the task of that run to serve

    admin = APIRouter(prefix="/v1/admin", dependencies=[bearer()])

    async def between_batches(change: Callable[[Any], None], argument: Any) -> None:
        """`change(argument)` on the inference thread between two batches: 503 when the queue is full, 409 when
        the engine refuses it."""
        try:
            await batcher.call(change, argument)
        except Busy as error:
            raise busy(error) from None
        except MultitunError as error:
            raise HTTPException(409, str(error)) from None

    @admin.get("/tasks")
    async def served() -> dict[str, Any]:
        """Every task served now, with its type, the run it comes from and whether it was loaded as its head and
        adapter only, onto a backbone served already (`adapter_only`)."""
        return {
            "tasks": [
                {
                    "name": name,
                    "type": data.config.type,
                    "run": engine.sources.get(name),
                    "adapter_only": name in engine.adopted,
                }
                for name, data in list(engine.tasks.items())
            ]
        }

    @admin.post("/tasks", status_code=201)
    async def load(body: LoadBody) -> dict[str, Any]:
        """Serve `task` of the finished run `run` (same backbone, model kind and max_length) from now on."""
        if body.task in engine.tasks:
            raise HTTPException(409, f"task '{body.task}' is already served (from {engine.sources.get(body.task)})")
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, engine.loadable, body.run, body.task)
        except MultitunError as error:
            raise HTTPException(400, " ".join(str(error).split())) from None
        await between_batches(engine.register, loaded)
        document(body.task, served=True)
        return {"loaded": body.task, "run": loaded.run}

    @admin.delete("/tasks/{task}")
    async def unload(task: str) -> dict[str, Any]:
        """Stop serving `task`; its requests still queued are answered 404."""
        if task not in engine.tasks:
            raise HTTPException(404, _unknown(task, engine))
        await between_batches(engine.unload, task)
        document(task, served=False)
        return {"unloaded": task}

    app.include_router(admin)


OWN_ROUTE = re.compile(r"^/v1/tasks/([^/{}]+)/(predict|generate)$")


def served_openapi(app: FastAPI, engine: Engine) -> Callable[[], dict[str, Any]]:
    """app.openapi for a server whose tasks change at run time: FastAPI's document of every route, less the own
    routes of tasks no longer served."""
    whole = app.openapi

    def openapi() -> dict[str, Any]:
        schema = whole()
        paths = {
            path: operations
            for path, operations in schema.get("paths", {}).items()
            if (found := OWN_ROUTE.match(path)) is None or found.group(1) in engine.tasks
        }
        return {**schema, "paths": paths}

    return openapi


async def _events(generation: Generation) -> AsyncIterator[str]:
    """Server-sent events: a `token` event per piece of text as it comes, then `done` with the whole text (as
    the route answers it unstreamed), or `error`."""
    try:
        async for piece in generation.pieces():
            if piece:
                yield f"event: token\ndata: {json.dumps({'token': piece}, ensure_ascii=False)}\n\n"
        if generation.gone:
            return
        text = generation.text
    except Exception as error:  # the headers are sent: report it in the stream
        yield f"event: error\ndata: {json.dumps({'detail': str(error) or type(error).__name__})}\n\n"
        return
    yield f"event: done\ndata: {json.dumps({'prediction': text}, ensure_ascii=False)}\n\n"


def busy(error: Busy) -> HTTPException:
    """A full queue as the client sees it: 503, retry after a second."""
    return HTTPException(503, str(error), {"Retry-After": "1"})


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
