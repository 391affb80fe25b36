"""Liveness, readiness (database and broker reachable) and who-am-I."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import EngineDep, PrincipalDep, QueueDep, SessionDep
from app.db.models import Tenant
from app.schemas import TenantOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(engine: EngineDep, queue: QueueDep) -> JSONResponse:
    """Ready when the database and the broker answer; 503 names what is down."""
    checks: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        queue.ping()
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/v1/me", response_model=TenantOut, tags=["auth"])
def me(principal: PrincipalDep, session: SessionDep) -> TenantOut:
    """The caller's tenant and the secret its callbacks are signed with."""
    tenant = session.get(Tenant, principal.tenant_id)
    assert tenant is not None
    return TenantOut(tenant=tenant.name, callback_secret=tenant.callback_secret)
