"""``/v1/models``: upload a checkpoint (streamed, size-limited, header-checked)."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, QueueDep, SessionDep, SettingsDep
from app.api.uploads import StoredFile, store_multipart, store_raw_body
from app.api.views import load_model, model_out
from app.checkpoint_check import CheckpointRejected, check_checkpoint
from app.core.config import Settings
from app.core.problems import Problem
from app.db.models import Model, ModelStatus
from app.queue import JobQueue
from app.schemas import ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])
log = logging.getLogger(__name__)

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def register_upload(session: Session, tenant_id: uuid.UUID, stored: StoredFile) -> Model:
    """Check the container and add the model row (the caller commits), or raise 422."""
    try:
        result = check_checkpoint(stored.head, stored.tail, stored.blob.size)
    except CheckpointRejected as exc:
        raise Problem(422, str(exc), field=stored.field) from None
    model = Model(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        filename=stored.filename[:255],
        blob_id=stored.blob.id,
        size=stored.blob.size,
        sha256=stored.blob.sha256,
        format=result.format,
        status=ModelStatus.PENDING,
    )
    session.add(model)
    return model


async def receive_files(
    request: Request, session: Session, settings: Settings, max_files: int
) -> tuple[list[StoredFile], dict[str, str]]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await store_multipart(
            request, session, settings.blob_chunk_bytes, settings.max_upload_bytes, max_files
        )
        return form.files, form.fields
    if ctype.startswith("application/octet-stream"):
        name = request.query_params.get("filename") or "model"
        stored = await store_raw_body(
            request, session, name, settings.blob_chunk_bytes, settings.max_upload_bytes
        )
        return [stored], {}
    raise Problem(
        415,
        "send the checkpoint as multipart/form-data (curl -F file=@model.safetensors) or as "
        "application/octet-stream (curl --data-binary @model.safetensors)",
    )


def enqueue_validation(queue: JobQueue, models: list[Model]) -> None:
    for model in models:
        try:
            queue.enqueue_validation(model.id)
        except Exception:  # noqa: BLE001 - the job's first stage validates anyway
            log.warning("could not enqueue validation of model %s", model.id, exc_info=True)


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    openapi_extra=UPLOAD_BODY,
    summary="Upload a checkpoint (safetensors or a torch.save'd state_dict)",
)
async def upload_model(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> ModelOut:
    files, _ = await receive_files(request, session, settings, max_files=1)
    if not files:
        raise Problem(422, "no file in the form: send it as the 'file' field", field="file")
    model = register_upload(session, principal.tenant_id, files[0])
    await run_in_threadpool(session.commit)
    enqueue_validation(queue, [model])
    response.headers["Location"] = f"/v1/models/{model.id}"
    return model_out(model)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> ModelOut:
    return model_out(load_model(session, principal.tenant_id, model_id))


@router.get("", response_model=list[ModelOut])
def list_models(principal: PrincipalDep, session: SessionDep, limit: int = 50) -> list[ModelOut]:
    rows = session.scalars(
        select(Model)
        .where(Model.tenant_id == principal.tenant_id)
        .order_by(Model.created_at.desc())
        .limit(max(1, min(limit, 200)))
    )
    return [model_out(m) for m in rows]
