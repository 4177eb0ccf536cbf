"""Builds the gateway's FastAPI application. `create_app()` reads the settings from the
environment, which is how `producer serve` (and `uvicorn --factory`) starts each process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from producer.async_client import AsyncClient
from producer.gateway import (
    batches,
    connections,
    files,
    health,
    logs,
    openai_routes,
    responses_routes,
    task_routes,
    usage,
)
from producer.gateway.auth import KeyRing
from producer.gateway.batch_feeder import run_feeder
from producer.gateway.chat import ChatCompletionRequest
from producer.gateway.door import Door, FailedKeys
from producer.gateway.errors import COMMON_ERRORS, ErrorBody, install_error_handlers
from producer.gateway.limits import Limiter
from producer.gateway.metrics import GatewayMetrics, MetricsMiddleware
from producer.gateway.state import GatewayState
from producer.gateway.wire import TaskSubmission, TaskUpload
from vision_queue import tracing
from vision_queue.redis_connect import async_redis_client
from vision_queue.settings import Settings, SettingsError

_DESCRIPTION = """\
Phi-3-vision over a durable task queue. Two APIs:

* **OpenAI-compatible** `POST /v1/chat/completions` (text and `image_url` parts, streaming)
  and `GET /v1/models`: any OpenAI SDK works with `base_url=<gateway>/v1`.
* **Native tasks** `/v1/tasks`: queue describe / ocr / compare / ask jobs, follow them as
  server-sent events, fetch or cancel them, or have the result POSTed to a webhook.

Authenticate with `Authorization: Bearer <API key>`. Errors have OpenAI's shape, with
`error.code` one of the codes in the README.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env(reader="gateway")
    keys = KeyRing(settings.api_key_digests, allow_anonymous=settings.gateway_allow_anonymous)
    if not settings.api_key_digests and not keys.allow_anonymous:
        raise SettingsError(
            "VQ_API_KEYS is empty: set API keys, or VQ_GATEWAY_ALLOW_ANONYMOUS=true to serve "
            "without them"
        )
    metrics = GatewayMetrics()
    connections.configure(settings)
    logs.install(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Pools sized for the process's concurrency: a burst waits for a connection (then
        # 429), never opens more than Redis or the file descriptors allow.
        pool = settings.gateway_redis_connections
        connection = async_redis_client(settings, max_connections=pool)
        async with AsyncClient(settings, pool_size=pool, local_files=False) as client:
            app.state.gateway = GatewayState(
                settings=settings,
                client=client,
                redis=connection,
                keys=keys,
                limiter=Limiter(connection, settings),
                metrics=metrics,
                document_renders=anyio.CapacityLimiter(settings.document_renders),
            )
            feeder = asyncio.ensure_future(run_feeder(app.state.gateway))
            try:
                yield
            finally:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
                await connection.aclose()

    app = FastAPI(
        title="vision-queue gateway",
        version="1",
        description=_DESCRIPTION,
        lifespan=lifespan,
        # No redirect is ever built (from the Host header or otherwise): /v1/tasks/ is 404.
        redirect_slashes=False,
    )
    app.state.model_name = settings.gateway_model_name
    app.include_router(openai_routes.router)
    app.include_router(task_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(usage.router)
    app.include_router(health.router)
    install_error_handlers(app)
    # Outermost last: metrics see every answer; CORS answers preflights and decorates
    # refusals; the door authenticates and caps the body before anything reads it.
    failures = FailedKeys(settings.gateway_auth_failures_per_minute)
    app.add_middleware(
        Door, keys=keys, max_body_bytes=settings.gateway_max_body_bytes, failures=failures
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-API-Key",
                "Last-Event-ID",
                "Idempotency-Key",
            ],
            expose_headers=["X-Task-Id", "Retry-After", "Location", "X-Request-Id"],
            max_age=600,
        )
    # Outermost: sees every answer.
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # A server span per request when OTEL_EXPORTER_OTLP_ENDPOINT is set (nothing otherwise);
    # here, not in `serve`, so that each uvicorn process sets up its own exporter.
    if tracing.setup("vq-gateway"):
        tracing.instrument_fastapi(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the two body schemas of POST /v1/tasks (read by hand)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, TaskSubmission, TaskUpload, ErrorBody):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        _document_errors(schema)
        # The served model as the example, so generated requests (and readers) use it.
        chat = components.get("ChatCompletionRequest", {}).get("properties", {})
        if "model" in chat:
            chat["model"]["examples"] = [app.state.model_name]
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _document_errors(schema: dict[str, Any]) -> None:
    """Every /v1 operation: the common error answers, in the error shape; never 422
    (validation failures are 400 here, in the same shape as every other error)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1"):
                continue
            for status, description in COMMON_ERRORS.items():
                responses.setdefault(str(status), {"description": description})
            for status, response in responses.items():
                if int(status) >= 400:
                    response["content"] = error
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
