"""The FastAPI application: ``uvicorn app.main:app`` (settings from ``CNC_*`` variables)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import AuthCache
from app.api.routes import batches, health, jobs, models
from app.core import problems
from app.core.config import Settings, get_settings
from app.db.session import get_engine
from app.metrics import Metrics, MetricsMiddleware
from app.queue import JobQueue

DESCRIPTION = """Upload a possibly-backdoored image classifier, get back a clean, compact one.

Authenticate with `Authorization: Bearer <API key>`. Errors are problem details
(`application/problem+json`) naming the offending field."""


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.auth_cache.stop()

    app = FastAPI(
        title="cnc: Clean & Compact", version="1.0.0", description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.engine = get_engine(
        settings.database_url,
        settings.db_pool_size,
        settings.db_max_overflow,
        settings.db_pool_pre_ping,
    )
    # Single-statement reads (status polls) run in autocommit: no BEGIN/ROLLBACK trips.
    app.state.read_engine = app.state.engine.execution_options(isolation_level="AUTOCOMMIT")
    app.state.queue = queue or JobQueue(settings)
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s, settings.database_url)
    metrics = Metrics(app.state.engine, app.state.queue)
    problems.install(app)
    for module in (health, models, jobs, batches):
        app.include_router(module.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app on first access, not on import.
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
