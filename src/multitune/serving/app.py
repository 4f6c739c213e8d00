"""`multitune serve RUN_DIR`: one HTTP JSON API for every task of a run, on one shared backbone.

Routes (all JSON; the OpenAPI schema is at /openapi.json, and /docs shows it as a page that needs no network;
both need the bearer token when one is set; every GET route also answers HEAD):
- GET  /healthz                        liveness, queue depth and batching counters (never needs a token)
- GET  /metrics                        the same and more in Prometheus' text format (serving/metrics.py; no token)
- GET  /v1/tasks                       each task's name, type, labels, input fields and metrics
- POST /v1/tasks/{task}/predict        {"inputs": [record, ...]} or {"input": record}
- POST /v1/predict                     {"inputs": [{"task": name, "input": record}, ...]}: several tasks at once
- POST /v1/tasks/{task}/generate       {"input": record, "stream": true} streams server-sent events
- GET  /v1/models, POST /v1/chat/completions, POST /v1/completions: OpenAI-compatible (serving/openai.py)
- GET, POST /v1/admin/tasks, DELETE /v1/admin/tasks/{task}: list, load (from another run) and unload tasks at
  run time; only with an admin token (`--admin-token` or $MULTITUNE_ADMIN_TOKEN), which they require

A record holds what its task's schema says (runs/predict.py's input_schema: the task's own text fields or the
generic `text`/`text_pair`/`tokens`), checked by the same function as in `multitune predict` (checked_input), and
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

from __future__ import annotations

import sys
from typing import Any

from multitune.errors import MultitunError
from multitune.serving.batcher import MicroBatcher
from multitune.serving.engine import Engine
from multitune.serving.guards import Access, RequestGuard, guarded_protocol
from multitune.serving.metrics import CountRequests, ServerMetrics
from multitune.serving.settings import ServeSettings

__all__ = ["ADMIN_TOKEN_VARIABLE", "TOKEN_VARIABLE", "ServeSettings", "create_app", "serve"]

TOKEN_VARIABLE = "MULTITUNE_SERVE_TOKEN"
ADMIN_TOKEN_VARIABLE = "MULTITUNE_ADMIN_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SWITCH_INTERVAL = 0.0005  # seconds (Python's default: 0.005)


def create_app(engine: Engine, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app answering `engine`'s tasks through a micro-batcher: the routes in the order they match
    (each task's own routes before the `{task}` ones), RequestGuard in front of everything: the bearer token of
    /v1, /docs and /openapi.json checked before a body is read."""
    # FastAPI is the optional `serve` extra: the modules that import it load only when an app is built
    from fastapi import APIRouter, FastAPI

    from multitune.serving import routes
    from multitune.serving.docs import add_docs
    from multitune.serving.openai import add_openai_routes
    from multitune.serving.schemas import request_models

    settings = settings or ServeSettings()
    batcher = MicroBatcher(engine, settings.max_batch_rows, settings.max_wait_ms, settings.max_queue)
    models = request_models(engine, settings)
    app = FastAPI(
        title="multitune",
        summary=f"Every task of {engine.run_dir.name} on one shared backbone",
        version="1",
        lifespan=routes.lifespan(batcher),
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: blank offline; /docs is served instead
        redoc_url=None,
    )
    app.state.engine, app.state.batcher = engine, batcher
    add_docs(app)
    routes.add_error_handlers(app)
    routes.add_health(app, engine, batcher)
    v1 = APIRouter(prefix="/v1", dependencies=[routes.bearer()])
    routes.add_tasks(v1, engine)
    answering = routes.Answering(engine, batcher, settings.max_chars)
    for name in engine.tasks:
        routes.add_own_routes(v1, name, answering, models)
    routes.add_predict_routes(v1, answering, models)
    routes.add_generate_route(v1, answering, models)
    add_openai_routes(v1, answering)
    if settings.admin_token:  # off unless asked for: loading reads any run the server's user can read
        routes.add_admin_routes(app, answering, models)
        app.openapi = routes.served_openapi(app, engine)  # type: ignore[method-assign]
    app.include_router(v1)
    metrics = ServerMetrics(batcher)
    routes.add_metrics(app, metrics)
    access = Access(settings.token, settings.admin_token or None)
    app.add_middleware(RequestGuard, limit=settings.max_body_bytes, body_timeout=settings.body_timeout, access=access)
    # outermost: it sees the guard's refusals too, and names their routes by the OpenAPI document's paths
    app.add_middleware(CountRequests, metrics=metrics, templates=lambda: list(app.openapi()["paths"]))
    return app


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
