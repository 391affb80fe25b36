"""Callbacks: POST a signed JSON body to a job's ``callback_url`` when it ends.

Signed with HMAC-SHA256 under the tenant's callback secret (header ``X-CNC-Signature:
t=<unix>,v1=<hex>`` over ``"<t>." + body``), retried with exponential backoff, and only to
hosts in ``CNC_CALLBACK_ALLOWED_HOSTS`` (checked again at delivery: the list may shrink).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import httpx
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.residual import residual_summary
from app.core.security import SIGNATURE_HEADER, host_allowed, sign_payload
from app.db.models import TERMINAL_STATUSES, CallbackStatus, Job, Tenant
from app.queue import JobQueue

log = logging.getLogger(__name__)


def payload(job: Job) -> dict[str, Any]:
    report = job.report or {}
    return {
        "event": f"job.{job.status}",
        "job": {
            "id": str(job.id),
            "status": job.status,
            "model_id": str(job.model_id),
            "batch_id": str(job.batch_id) if job.batch_id else None,
            "error": {"code": job.error_code, "message": job.error} if job.error else None,
            "suspected_target": job.suspected_target,
            "residual_check": residual_summary(report),
            "metrics": report.get("metrics") if isinstance(report, dict) else None,
            "device": job.device,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "links": {"self": f"/v1/jobs/{job.id}", "artifacts": f"/v1/jobs/{job.id}/artifacts"},
        },
    }


def _set(engine: Engine, job_id: uuid.UUID, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(**values))


def deliver(
    engine: Engine,
    settings: Settings,
    queue: JobQueue,
    job_id: uuid.UUID | str,
    attempt: int = 1,
    client: httpx.Client | None = None,
) -> str:
    """One delivery attempt; schedules the next on failure. Returns the callback status."""
    job_id = uuid.UUID(str(job_id))
    with Session(engine) as session:
        job = session.get(Job, job_id)
        if job is None or not job.callback_url or job.status not in TERMINAL_STATUSES:
            return "skipped"
        if job.callback_status != CallbackStatus.PENDING:
            return job.callback_status
        tenant = session.get(Tenant, job.tenant_id)
        assert tenant is not None
        url, secret, body = job.callback_url, tenant.callback_secret, payload(job)
    if not host_allowed(url, settings.callback_allowed_hosts):
        _set(
            engine,
            job_id,
            callback_status=CallbackStatus.FAILED,
            callback_attempts=attempt,
            callback_error="callback host is not in CNC_CALLBACK_ALLOWED_HOSTS",
        )
        return CallbackStatus.FAILED
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "cnc-callbacks/1",
        SIGNATURE_HEADER: sign_payload(secret, raw),
        "X-CNC-Event": body["event"],
        "X-CNC-Delivery": f"{job_id}/{attempt}",
    }
    error: str | None = None
    own = client is None
    http = client or httpx.Client(timeout=settings.callback_timeout_s, follow_redirects=False)
    try:
        response = http.post(url, content=raw, headers=headers)
        if 200 <= response.status_code < 300:
            _set(
                engine,
                job_id,
                callback_status=CallbackStatus.DELIVERED,
                callback_attempts=attempt,
                callback_error=None,
            )
            return CallbackStatus.DELIVERED
        error = f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if own:
            http.close()
    if attempt >= settings.callback_max_attempts:
        _set(
            engine,
            job_id,
            callback_status=CallbackStatus.FAILED,
            callback_attempts=attempt,
            callback_error=f"gave up after {attempt} attempts; last: {error}",
        )
        return CallbackStatus.FAILED
    _set(engine, job_id, callback_attempts=attempt, callback_error=error)
    delay = settings.callback_backoff_s * 2 ** (attempt - 1)
    log.info(
        "callback of job %s failed (%s); retry %d in %.0f s", job_id, error, attempt + 1, delay
    )
    queue.enqueue_callback(job_id, attempt + 1, countdown=delay)
    return CallbackStatus.PENDING
