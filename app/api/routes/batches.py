"""``/v1/batches``: many jobs in one request, and their aggregate status."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, QueueDep, SessionDep, SettingsDep
from app.api.jobs_service import enqueue, new_job
from app.api.routes.jobs import parse_body
from app.api.routes.models import enqueue_validation, receive_files, register_upload
from app.api.views import job_links
from app.core.problems import Problem
from app.db.models import Batch, Job, JobStatus
from app.schemas import (
    BatchJobOut,
    BatchOut,
    BatchRequest,
    JobOptions,
    JobSpec,
    digest_of,
    upload_request_hash,
)

router = APIRouter(prefix="/v1/batches", tags=["batches"])

BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "spec": {"type": "string", "description": "JobOptions as JSON, for all"},
                    },
                    "required": ["files", "spec"],
                }
            },
        },
    }
}


def aggregate_status(counts: Counter[str], total: int) -> str:
    """``running`` while any job is unfinished; then ``succeeded`` when all succeeded,
    else ``completed_with_errors``."""
    if counts[JobStatus.QUEUED] + counts[JobStatus.RUNNING] > 0:
        return "running" if counts[JobStatus.QUEUED] < total else "queued"
    return "succeeded" if counts[JobStatus.SUCCEEDED] == total else "completed_with_errors"


def batch_out(batch: Batch, jobs: list[Job]) -> BatchOut:
    counts: Counter[str] = Counter(j.status for j in jobs)
    return BatchOut(
        id=batch.id,
        status=aggregate_status(counts, len(jobs)),
        created_at=batch.created_at,
        total=len(jobs),
        counts={s.value: counts[s.value] for s in JobStatus},
        jobs=[
            BatchJobOut(
                id=j.id,
                model_id=j.model_id,
                status=j.status,
                percent=j.percent,
                links=job_links(j.id),
            )
            for j in jobs
        ],
        links={"self": f"/v1/batches/{batch.id}", "jobs": f"/v1/jobs?batch_id={batch.id}"},
    )


@router.post(
    "",
    status_code=202,
    response_model=BatchOut,
    openapi_extra=BATCH_BODY,
    summary="Submit many jobs: a JSON manifest of specs, or several files with one spec",
)
async def submit_batch(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Create a batch. With an ``Idempotency-Key``, the same key and body return the same
    batch (``Idempotent-Replayed: true``; a retried upload's files are not stored twice)
    and a different body is ``409``, as for jobs. For a multipart body, "the same body"
    means the same options and the same files (by sha256) in the same order."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise Problem(422, "Idempotency-Key must be 1-255 characters", field="Idempotency-Key")
    ctype = request.headers.get("content-type", "")
    models = []
    if ctype.startswith("multipart/form-data"):
        files, fields = await receive_files(
            request, session, settings, max_files=settings.max_batch_jobs
        )
        if "spec" not in fields:
            raise Problem(422, "the form needs a 'spec' field (job options as JSON)", field="spec")
        options = parse_body(JobOptions, fields["spec"], ("spec",))
        if not files:
            raise Problem(422, "the form holds no files", field="files")
        digest = upload_request_hash(options, [(f.filename, f.blob.sha256) for f in files])
        replay = await run_in_threadpool(
            find_batch, session, principal.tenant_id, idempotency_key, digest
        )
        if replay is not None:
            await run_in_threadpool(session.rollback)  # drop the files stored again
            return await run_in_threadpool(_replayed, session, replay)
        models = [register_upload(session, principal.tenant_id, f) for f in files]
        await run_in_threadpool(session.flush)
        specs = [JobSpec(**options.model_dump(), model_id=m.id) for m in models]
    else:
        manifest = parse_body(BatchRequest, await request.body())  # type: ignore[arg-type]
        specs = list(manifest.jobs)
        digest = digest_of([s.model_dump(mode="json") for s in specs])
        replay = await run_in_threadpool(
            find_batch, session, principal.tenant_id, idempotency_key, digest
        )
        if replay is not None:
            return await run_in_threadpool(_replayed, session, replay)
    if len(specs) > settings.max_batch_jobs:
        raise Problem(422, f"at most {settings.max_batch_jobs} jobs per batch", field="jobs")
    batch = Batch(
        id=uuid.uuid4(),
        tenant_id=principal.tenant_id,
        idempotency_key=idempotency_key,
        request_hash=digest,
    )

    def create() -> list[Job] | Batch:
        session.add(batch)
        jobs = [
            new_job(
                session,
                principal.tenant_id,
                spec,
                settings,
                batch_id=batch.id,
                field_prefix=f"jobs.{i}.",
            )
            for i, spec in enumerate(specs)
        ]
        try:
            session.commit()
        except IntegrityError:
            # A concurrent request with the same key won the race: answer as its replay.
            session.rollback()
            earlier = find_batch(session, principal.tenant_id, idempotency_key, digest)
            if earlier is None:
                raise
            return earlier
        return jobs

    created = await run_in_threadpool(create)
    if isinstance(created, Batch):
        return await run_in_threadpool(_replayed, session, created)
    enqueue_validation(queue, models)
    await run_in_threadpool(enqueue, session, queue, created)
    await run_in_threadpool(session.refresh, batch)
    return _accepted(batch_out(batch, created), replayed=False)


def find_batch(
    session: Session, tenant_id: uuid.UUID, key: str | None, digest: str
) -> Batch | None:
    """The batch an earlier request with this key created; 409 when the body differs."""
    if key is None:
        return None
    batch = session.scalars(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key)
    ).one_or_none()
    if batch is not None and batch.request_hash != digest:
        raise Problem(
            409,
            f"Idempotency-Key {key!r} was used with a different request body (batch {batch.id})",
            field="Idempotency-Key",
        )
    return batch


def _jobs_of(session: Session, batch: Batch) -> list[Job]:
    return list(
        session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.created_at))
    )


def _replayed(session: Session, batch: Batch) -> JSONResponse:
    return _accepted(batch_out(batch, _jobs_of(session, batch)), replayed=True)


def _accepted(out: BatchOut, replayed: bool) -> JSONResponse:
    headers = {"Location": f"/v1/batches/{out.id}", "Retry-After": "5"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(out.model_dump(mode="json"), status_code=202, headers=headers)


@router.get("/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> BatchOut:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != principal.tenant_id:
        raise Problem(404, f"no batch {batch_id}")
    return batch_out(batch, _jobs_of(session, batch))
