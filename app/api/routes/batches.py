"""``/v1/batches``: many jobs in one request, and their aggregate status."""

from __future__ import annotations

import uuid
from collections import Counter

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, QueueDep, SessionDep, SettingsDep
from app.api.jobs_service import enqueue, new_job
from app.api.routes.jobs import parse_body
from app.api.routes.models import enqueue_validation, receive_files, register_upload
from app.api.views import job_links
from app.core.problems import Problem
from app.db.models import Batch, Job, JobStatus
from app.schemas import BatchJobOut, BatchOut, BatchRequest, JobOptions, JobSpec

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
) -> JSONResponse:
    ctype = request.headers.get("content-type", "")
    batch = Batch(id=uuid.uuid4(), tenant_id=principal.tenant_id)
    session.add(batch)
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
        models = [register_upload(session, principal.tenant_id, f) for f in files]
        await run_in_threadpool(session.flush)
        specs = [JobSpec(**options.model_dump(), model_id=m.id) for m in models]
    else:
        manifest = parse_body(BatchRequest, await request.body())  # type: ignore[arg-type]
        specs = list(manifest.jobs)
    if len(specs) > settings.max_batch_jobs:
        raise Problem(422, f"at most {settings.max_batch_jobs} jobs per batch", field="jobs")

    def create() -> list[Job]:
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
        session.commit()
        return jobs

    jobs = await run_in_threadpool(create)
    enqueue_validation(queue, models)
    await run_in_threadpool(enqueue, session, queue, jobs)
    await run_in_threadpool(session.refresh, batch)
    out = batch_out(batch, jobs)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/batches/{batch.id}", "Retry-After": "5"},
    )


@router.get("/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> BatchOut:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != principal.tenant_id:
        raise Problem(404, f"no batch {batch_id}")
    jobs = list(
        session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.created_at))
    )
    return batch_out(batch, jobs)
