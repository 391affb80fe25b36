"""Rows to response bodies, and shared look-ups scoped to the caller's tenant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, Row, select
from sqlalchemy.orm import Session

from app.core.problems import Problem
from app.core.residual import residual_summary
from app.db.models import Artifact, CallbackStatus, Job, JobStatus, Model
from app.schemas import ArtifactOut, CallbackOut, ErrorOut, JobOut, ModelOut, ResidualCheckOut


def model_out(model: Model) -> ModelOut:
    return ModelOut(
        id=model.id,
        filename=model.filename,
        size=model.size,
        sha256=model.sha256,
        format=model.format,
        status=model.status,
        error=model.error,
        summary=model.summary,
        created_at=model.created_at,
        validated_at=model.validated_at,
        links={"self": f"/v1/models/{model.id}"},
    )


def job_links(job_id: uuid.UUID) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {
        "self": base,
        "events": f"{base}/events",
        "artifacts": f"{base}/artifacts",
        "cancel": f"{base}/cancel",
    }


# An ORM row or a Core row of the jobs table: both have the columns as attributes.
JobRow = Job | Row[Any]
ArtifactRow = Artifact | Row[Any]


def job_out(job: JobRow, artifacts: Sequence[ArtifactRow] = ()) -> JobOut:
    report = job.report or {}
    metrics = report.get("metrics") if isinstance(report, dict) else None
    residual = residual_summary(report)
    return JobOut(
        id=job.id,
        status=job.status,
        stage=job.stage,
        percent=job.percent,
        eta_s=job.eta_s,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        device=job.device,
        model_id=job.model_id,
        batch_id=job.batch_id,
        spec=job.spec,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        timings=job.timings or {},
        suspected_target=job.suspected_target,
        residual_check=ResidualCheckOut(**residual) if residual else None,
        metrics=metrics if isinstance(metrics, dict) else None,
        error=ErrorOut(code=job.error_code or "error", message=job.error) if job.error else None,
        cancel_requested=job.cancel_requested,
        callback=(
            CallbackOut(
                url=job.callback_url,
                status=job.callback_status,
                attempts=job.callback_attempts,
                error=job.callback_error,
            )
            if job.callback_url
            else None
        ),
        artifacts=[
            ArtifactOut(
                name=a.name,
                size=a.size,
                sha256=a.sha256,
                content_type=a.content_type,
                url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
            )
            for a in artifacts
        ],
        links=job_links(job.id),
    )


def read_job(engine: Engine, tenant_id: uuid.UUID, job_id: uuid.UUID) -> JobOut | None:
    """The status view of a job, or None: the poll's fast path.

    Core rows rather than ORM objects (no session, identity map or attribute tracking),
    one query, plus one for the artifacts of a succeeded job. ``engine`` should be in
    autocommit mode, so there is no BEGIN/ROLLBACK round trip around the SELECT.
    """
    jobs, artifacts = Job.__table__, Artifact.__table__
    with engine.connect() as conn:
        row = conn.execute(
            select(jobs).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id)
        ).one_or_none()
        if row is None:
            return None
        found: Sequence[Any] = ()
        if row.status == JobStatus.SUCCEEDED:
            found = conn.execute(
                select(
                    artifacts.c.name, artifacts.c.size, artifacts.c.sha256, artifacts.c.content_type
                )
                .where(artifacts.c.job_id == job_id)
                .order_by(artifacts.c.name)
            ).all()
    return job_out(row, found)


def load_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job, or 404 (another tenant's job is indistinguishable from none)."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise Problem(404, f"no job {job_id}")
    return job


def load_artifacts(session: Session, job: Job) -> list[Artifact]:
    if job.status != JobStatus.SUCCEEDED:
        return []
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name))
    )


def job_with_artifacts(session: Session, job: Job) -> JobOut:
    return job_out(job, load_artifacts(session, job))


def initial_callback_status(url: str | None) -> str:
    return CallbackStatus.PENDING if url else CallbackStatus.NONE


def load_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise Problem(404, f"no model {model_id}")
    return model
