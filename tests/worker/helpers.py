"""Rows for worker tests, created directly (no HTTP)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.cli import create_key
from app.core.config import Settings
from app.db.blobs import write_file
from app.db.models import Job, JobStatus, Model
from tests.service_support import BASE_SPEC


def tiny_checkpoint(path: Path, width: int = 8, seed: int = 0) -> Path:
    import safetensors.torch
    import torch

    from cnc_core.models import create_model

    torch.manual_seed(seed)
    model = create_model("simple_cnn", num_classes=10, in_chans=3, width=width)
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def add_model(
    engine: Engine, settings: Settings, path: Path, fmt: str = "safetensors", tenant: str = "acme"
) -> tuple[uuid.UUID, uuid.UUID]:
    tenant_id = create_key(engine, settings, tenant).tenant_id
    with Session(engine) as s, s.begin():
        blob = write_file(s, path, settings.blob_chunk_bytes)
        model = Model(
            tenant_id=tenant_id,
            filename=path.name,
            blob_id=blob.id,
            size=blob.size,
            sha256=blob.sha256,
            format=fmt,
        )
        s.add(model)
        s.flush()
        return tenant_id, model.id


def add_job(engine: Engine, tenant_id: uuid.UUID, model_id: uuid.UUID, **spec: Any) -> uuid.UUID:
    with Session(engine) as s, s.begin():
        job = Job(
            tenant_id=tenant_id,
            model_id=model_id,
            spec={**BASE_SPEC, "model_id": str(model_id), **spec},
            status=JobStatus.QUEUED,
            callback_url=spec.get("callback_url"),
            callback_status="pending" if spec.get("callback_url") else "none",
            task_id=str(uuid.uuid4()),
        )
        s.add(job)
        s.flush()
        return job.id


def get_job(engine: Engine, job_id: uuid.UUID) -> Job:
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job
