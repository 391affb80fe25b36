"""Creating jobs: validation against the model row, idempotency, enqueue after commit."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Problem
from app.core.security import host_allowed
from app.db.models import CallbackStatus, Job, JobStatus, Model, ModelStatus
from app.queue import JobQueue
from app.schemas import JobSpec, request_hash

log = logging.getLogger(__name__)


def check_callback(spec: JobSpec, settings: Settings, field: str = "callback_url") -> None:
    if spec.callback_url is None:
        return
    if not host_allowed(spec.callback_url, settings.callback_allowed_hosts):
        allowed = ", ".join(settings.callback_allowed_hosts) or "none configured"
        raise Problem(
            422,
            f"callback host not in the allowlist (CNC_CALLBACK_ALLOWED_HOSTS: {allowed})",
            field=field,
        )


def new_job(
    session: Session,
    tenant_id: uuid.UUID,
    spec: JobSpec,
    settings: Settings,
    *,
    batch_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    field_prefix: str = "",
    digest: str | None = None,
) -> Job:
    """Add a queued job row for ``spec`` (the caller commits, then calls :func:`enqueue`)."""
    model = session.get(Model, spec.model_id)
    if model is None or model.tenant_id != tenant_id:
        raise Problem(422, f"no model {spec.model_id}", field=f"{field_prefix}model_id")
    if model.status == ModelStatus.INVALID:
        raise Problem(
            422,
            f"model {model.id} failed validation: {model.error}",
            field=f"{field_prefix}model_id",
        )
    check_callback(spec, settings, f"{field_prefix}callback_url")
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        model_id=model.id,
        batch_id=batch_id,
        spec=spec.model_dump(mode="json"),
        status=JobStatus.QUEUED,
        stage="queued",
        percent=0.0,
        attempt=0,
        max_attempts=settings.max_attempts,
        timings={},
        idempotency_key=idempotency_key,
        request_hash=digest or request_hash(spec),
        callback_url=spec.callback_url,
        callback_status=CallbackStatus.PENDING if spec.callback_url else CallbackStatus.NONE,
        callback_attempts=0,
        cancel_requested=False,
        task_id=str(uuid.uuid4()),
        enqueued_at=datetime.now(UTC),
    )
    session.add(job)
    return job


def find_idempotent(
    session: Session,
    tenant_id: uuid.UUID,
    key: str,
    spec: JobSpec | None,
    digest: str | None = None,
) -> Job | None:
    """The job an earlier request with this key created; 409 when the body differs.

    ``digest`` is the request's hash when it is not the spec's (a multipart upload)."""
    job = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    ).one_or_none()
    expected = digest or (request_hash(spec) if spec is not None else None)
    if job is not None and job.request_hash != expected:
        raise Problem(
            409,
            f"Idempotency-Key {key!r} was used with a different request body (job {job.id})",
            field="Idempotency-Key",
        )
    return job


def check_idempotency_key(key: str) -> None:
    if not 1 <= len(key) <= 255:
        raise Problem(422, "Idempotency-Key must be 1-255 characters", field="Idempotency-Key")


def create_job(
    session: Session,
    tenant_id: uuid.UUID,
    spec: JobSpec,
    settings: Settings,
    idempotency_key: str | None,
    digest: str | None = None,
) -> tuple[Job, bool]:
    """Create and commit a job; returns ``(job, replayed)``. Does not enqueue.

    ``digest`` identifies the request when the spec alone does not (see
    :func:`app.schemas.upload_request_hash`)."""
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
        existing = find_idempotent(session, tenant_id, idempotency_key, spec, digest)
        if existing is not None:
            session.rollback()  # anything this request added (a re-uploaded file) goes
            return existing, True
    job = new_job(
        session, tenant_id, spec, settings, idempotency_key=idempotency_key, digest=digest
    )
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the race: answer as a replay.
        session.rollback()
        assert idempotency_key is not None
        existing = find_idempotent(session, tenant_id, idempotency_key, spec, digest)
        if existing is None:
            raise
        return existing, True
    return job, False


def enqueue(session: Session, queue: JobQueue, jobs: list[Job]) -> None:
    """Send committed jobs to the broker. A failed send leaves ``enqueued_at`` empty, and
    a worker's reaper sends the job again once the broker is back."""
    for job in jobs:
        assert job.task_id is not None
        try:
            queue.enqueue_job(job.id, job.task_id)
        except Exception:  # noqa: BLE001 - the row is the truth; the reaper retries
            log.warning("enqueue of job %s failed; the reaper will retry", job.id, exc_info=True)
            session.execute(update(Job).where(Job.id == job.id).values(enqueued_at=None))
            session.commit()
