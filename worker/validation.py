"""Loading an uploaded checkpoint safely and recording the verdict on its model row.

``cnc_core.io.read_state_dict`` loads with ``torch.load(weights_only=True)`` (or
safetensors), so a hostile pickle raises instead of running code.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, update
from sqlalchemy.orm import Session

from app.db.blobs import copy_to_file
from app.db.models import Model, ModelStatus

SUFFIX = {"safetensors": ".safetensors", "torch-zip": ".pt"}


def fetch_checkpoint(engine: Engine, model: Model, folder: Path) -> Path:
    """Copy the model's blob to ``folder``; the suffix tells the loader the format."""
    path = folder / f"model{SUFFIX.get(model.format, '.bin')}"
    copy_to_file(engine, model.blob_id, path)
    return path


def summarize(path: Path) -> dict[str, Any]:
    """Load the state dict; raises ``cnc_core.io.CheckpointError`` with a readable reason."""
    from cnc_core.io import read_state_dict  # torch lives only behind this import

    state = read_state_dict(path)
    return {
        "tensors": len(state),
        "parameters": int(sum(t.numel() for t in state.values())),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
    }


def record(
    engine: Engine, model_id: uuid.UUID, summary: dict[str, Any] | None, error: str | None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Model)
            .where(Model.id == model_id)
            .values(
                status=ModelStatus.INVALID if error else ModelStatus.VALID,
                error=error,
                summary=summary,
                validated_at=func.now(),
            )
        )


def validate_model(engine: Engine, model_id: uuid.UUID, work_dir: str | None = None) -> str:
    """Validate a pending model; returns its status afterwards."""
    from cnc_core.io import CheckpointError

    with Session(engine) as session:
        model = session.get(Model, model_id)
        if model is None:
            return "missing"
        if model.status != ModelStatus.PENDING:
            return model.status
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="cnc-validate-") as tmp:
        path = fetch_checkpoint(engine, model, Path(tmp))
        try:
            summary = summarize(path)
        except CheckpointError as exc:
            record(engine, model_id, None, str(exc))
            return ModelStatus.INVALID
    record(engine, model_id, summary, None)
    return ModelStatus.VALID
