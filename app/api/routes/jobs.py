"""``/v1/jobs``: submit, list, poll, cancel, stream progress, download artifacts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import Engine, select, tuple_
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, PrincipalDep, QueueDep, SessionDep, SettingsDep
from app.api.jobs_service import create_job, enqueue
from app.api.routes.models import enqueue_validation, receive_files, register_upload
from app.api.views import job_out, job_with_artifacts, load_job, read_job
from app.core.problems import Problem
from app.db.blobs import iter_blob
from app.db.models import TERMINAL_STATUSES, Artifact, Job, JobStatus, Model
from app.schemas import (
    ArtifactOut,
    JobOptions,
    JobOut,
    JobPage,
    JobSpec,
    upload_request_hash,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

RETRY_AFTER_S = "2"

JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "spec": {"type": "string", "description": "JobOptions as JSON"},
                    },
                    "required": ["file", "spec"],
                }
            },
        },
    }
}


def parse_body(model: type[JobOptions], raw: str | bytes, prefix: tuple[str, ...] = ()) -> Any:
    """Validate a JSON body; a 422 names each offending field."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(
            422, f"body is not valid JSON: {exc}", field=".".join(prefix) or "body"
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *prefix, *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def accepted(job: Job, out: JobOut, replayed: bool) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{job.id}", "Retry-After": RETRY_AFTER_S}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(out.model_dump(mode="json"), status_code=202, headers=headers)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    openapi_extra=JOB_BODY,
    summary="Submit a job (JSON spec on an uploaded model, or multipart file + spec)",
)
async def submit_job(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    ctype = request.headers.get("content-type", "")
    models: list[Model] = []
    digest = None
    if ctype.startswith("multipart/form-data"):
        files, fields = await receive_files(request, session, settings, max_files=1)
        if "spec" not in fields:
            raise Problem(
                422, "the form needs a 'spec' field (the job options as JSON)", field="spec"
            )
        options = parse_body(JobOptions, fields["spec"], ("spec",))
        if not files:
            raise Problem(422, "the form needs a 'file' field (the checkpoint)", field="file")
        # A retried upload is the same request when the options and the file are.
        digest = upload_request_hash(options, [(files[0].filename, files[0].blob.sha256)])
        models = [register_upload(session, principal.tenant_id, files[0])]
        await run_in_threadpool(session.flush)
        spec = JobSpec(**options.model_dump(), model_id=models[0].id)
    else:
        spec = parse_body(JobSpec, await request.body())
    # Model and job commit together; a replay rolls the re-uploaded file back.
    job, replayed = await run_in_threadpool(
        create_job, session, principal.tenant_id, spec, settings, idempotency_key, digest
    )
    if not replayed:
        enqueue_validation(queue, models)
        await run_in_threadpool(enqueue, session, queue, [job])
    out = await run_in_threadpool(job_with_artifacts, session, job)
    return accepted(job, out, replayed)


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, TypeError, binascii.Error):
        raise Problem(422, "invalid cursor", field="cursor") from None


@router.get("", response_model=JobPage)
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    batch_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobPage:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    query = select(Job).where(Job.tenant_id == principal.tenant_id)
    if status:
        query = query.where(Job.status.in_([s.value for s in status]))
    if created_after is not None:
        query = query.where(Job.created_at >= created_after)
    if created_before is not None:
        query = query.where(Job.created_at < created_before)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    if cursor:
        at, last_id = _decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(at, last_id))
    rows = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(
        items=[job_with_artifacts(session, j) for j in rows],
        next_cursor=_encode_cursor(rows[-1]) if more and rows else None,
    )


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: uuid.UUID, request: Request, principal: PrincipalDep) -> Response:
    """Poll a job. The hot path of the API: one thread-pool hop for one SELECT, no ORM,
    and the body serialised once by pydantic (returning a ``Response`` skips FastAPI's
    second validation of the response model)."""
    out = await run_in_threadpool(
        read_job, request.app.state.read_engine, principal.tenant_id, job_id
    )
    if out is None:
        raise Problem(404, f"no job {job_id}")
    headers = {} if out.status in TERMINAL_STATUSES else {"Retry-After": RETRY_AFTER_S}
    return Response(out.model_dump_json(), media_type="application/json", headers=headers)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, queue: QueueDep
) -> JobOut:
    """Cancel: a queued job ends ``cancelled`` at once; a running one stops at its next
    progress report (the worker frees the GPU) and then ends ``cancelled``."""
    job = load_job(session, principal.tenant_id, job_id)
    session.refresh(job, with_for_update=True)
    if job.status in TERMINAL_STATUSES:
        raise Problem(409, f"job {job.id} already ended: {job.status}")
    job.cancel_requested = True
    ended = job.status == JobStatus.QUEUED
    if ended:
        job.status = JobStatus.CANCELLED
        job.stage = "cancelled"
        job.finished_at = datetime.now(UTC)
        job.eta_s = None
    session.commit()
    if job.task_id:
        queue.revoke(job.task_id)
    if ended and job.callback_url:
        queue.enqueue_callback(job.id)
    return job_out(job)


def _snapshot(engine: Engine, tenant_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(
                Job.status,
                Job.stage,
                Job.percent,
                Job.eta_s,
                Job.attempt,
                Job.error,
                Job.device,
                Job.tenant_id,
            ).where(Job.id == job_id)
        ).one_or_none()
    if row is None or row.tenant_id != tenant_id:
        return None
    return {
        "id": str(job_id),
        "status": row.status,
        "stage": row.stage,
        "percent": row.percent,
        "eta_s": row.eta_s,
        "attempt": row.attempt,
        "device": row.device,
        "error": row.error,
    }


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Progress as Server-Sent Events (curl -N)",
)
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
) -> StreamingResponse:
    engine = request.app.state.read_engine  # one SELECT per snapshot: no transaction needed
    first = await run_in_threadpool(_snapshot, engine, principal.tenant_id, job_id)
    if first is None:
        raise Problem(404, f"no job {job_id}")

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        last: dict[str, Any] | None = None
        seq = 0
        sent = time.monotonic()
        snap: dict[str, Any] | None = first
        while snap is not None:
            if snap != last:
                seq += 1
                yield f"id: {seq}\nevent: progress\ndata: {json.dumps(snap)}\n\n"
                last, sent = snap, time.monotonic()
            if snap["status"] in TERMINAL_STATUSES:
                yield f"event: end\ndata: {json.dumps(snap)}\n\n"
                return
            if time.monotonic() - sent > 15:
                yield ": keep-alive\n\n"
                sent = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.sse_poll_s)
            snap = await run_in_threadpool(_snapshot, engine, principal.tenant_id, job_id)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep
) -> list[ArtifactOut]:
    job = load_job(session, principal.tenant_id, job_id)
    return job_with_artifacts(session, job).artifacts


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range ``[start, end)`` from a Range header; None means the whole file.

    Raises ``Problem(416)`` for an unsatisfiable range."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: serve the whole representation
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        start, end = max(size - int(last), 0), size
    else:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        raise Problem(
            416,
            f"range not satisfiable for {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


@router.get("/{job_id}/artifacts/{name:path}", response_class=StreamingResponse)
def download_artifact(
    job_id: uuid.UUID,
    name: str,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    engine: EngineDep,
) -> Response:
    """Stream an artifact, with ``ETag`` (its sha256), a digest header and Range support."""
    job = load_job(session, principal.tenant_id, job_id)
    artifact = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)
    ).one_or_none()
    if artifact is None:
        raise Problem(404, f"job {job.id} has no artifact {name!r}")
    etag = f'"{artifact.sha256}"'
    b64 = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    inline = artifact.content_type.startswith(("image/", "application/json", "text/markdown"))
    filename = name.rsplit("/", 1)[-1]
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Repr-Digest": f"sha-256=:{b64}:",
        "Cache-Control": "private, max-age=86400, immutable",
        "Content-Disposition": f'{"inline" if inline else "attachment"}; filename="{filename}"',
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    span = None
    if "range" in request.headers:
        if_range = request.headers.get("if-range")
        if if_range is None or if_range.strip() == etag:
            span = parse_range(request.headers["range"], artifact.size)
    start, end = span or (0, artifact.size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
    return StreamingResponse(
        iter_blob(engine, artifact.blob_id, start, end),
        status_code=status,
        media_type=artifact.content_type,
        headers=headers,
    )
