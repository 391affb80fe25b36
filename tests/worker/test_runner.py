"""The job runner in process: real cnc_core on a tiny model, real Postgres, real Redis."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.blobs import iter_blob
from app.db.models import Artifact, Job, JobStatus, Model, ModelStatus
from tests.service_support import make_settings, queued_tasks
from tests.worker.helpers import add_job, add_model, get_job, tiny_checkpoint
from worker.runner import ProgressWriter, execute_job
from worker.validation import validate_model


def test_job_runs_to_success_and_stores_artifacts(engine, settings, queue, tmp_path):
    tenant, model_id = add_model(engine, settings, tiny_checkpoint(tmp_path / "m.safetensors"))
    job_id = add_job(engine, tenant, model_id, callback_url="http://127.0.0.1:9/hook")
    assert execute_job(job_id, settings, engine, queue) == "succeeded"
    job = get_job(engine, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.percent == 100.0
    assert job.device == "cpu" and job.attempt == 1 and job.lease_owner is None
    assert {"download", "run", "total"} <= set(job.timings)
    assert job.report is not None and "metrics" in job.report
    with Session(engine) as s:
        names = set(s.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
        model = s.get(Model, model_id)
        png = s.scalars(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.name == "plots/spectra.png")
        ).one()
    assert {
        "model.safetensors",
        "manifest.json",
        "model.onnx",
        "report.json",
        "plots/spectra.png",
    } <= names
    assert b"".join(iter_blob(engine, png.blob_id)).startswith(b"\x89PNG")
    assert model is not None and model.status == ModelStatus.VALID
    assert model.summary is not None and model.summary["tensors"] > 0
    # Terminal with a callback_url: the delivery is queued.
    light = queued_tasks(queue, settings.light_queue)
    assert light[-1]["task"] == "cnc.deliver_callback" and light[-1]["args"][0] == str(job_id)
    # A second delivery of the same task does nothing.
    assert execute_job(job_id, settings, engine, queue) == "skipped"


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    import os

    import torch

    class Evil:
        def __reduce__(self):  # runs os.system on an unsafe load
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "evil": Evil()}, str(path))
    return path


def test_hostile_pickle_never_runs(engine, settings, queue, tmp_path):
    from app.checkpoint_check import check_checkpoint

    marker = tmp_path / "pwned"
    path = _hostile_checkpoint(tmp_path / "evil.pt", marker)
    data = path.read_bytes()
    # The container is a torch zip, so the API's header check lets it through ...
    assert check_checkpoint(data[: 1 << 20], data[-(256 << 10) :], len(data)).format == "torch-zip"
    tenant, model_id = add_model(engine, settings, path, fmt="torch-zip")
    # ... and the worker's weights-only load refuses it, with a reason, running nothing.
    assert validate_model(engine, model_id) == ModelStatus.INVALID
    with Session(engine) as s:
        model = s.get(Model, model_id)
        assert model is not None and model.error
    assert not marker.exists()
    # A job on it fails readably, still without running the payload.
    with engine.begin() as conn:
        conn.execute(update(Model).where(Model.id == model_id).values(status="pending"))
    job_id = add_job(engine, tenant, model_id)
    assert execute_job(job_id, settings, engine, queue) == "failed"
    job = get_job(engine, job_id)
    assert job.error_code == "invalid_checkpoint" and job.error
    assert not marker.exists()


def test_cancel_stops_a_running_job(engine, settings, queue, tmp_path):
    slow = make_settings(settings.database_url, job_start_delay_s=30.0)
    tenant, model_id = add_model(engine, slow, tiny_checkpoint(tmp_path / "m.safetensors"))
    job_id = add_job(engine, tenant, model_id)

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if get_job(engine, job_id).stage == "prepare":
                with engine.begin() as conn:
                    conn.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
                return
            time.sleep(0.05)

    t = threading.Thread(target=cancel_when_running)
    t.start()
    started = time.monotonic()
    assert execute_job(job_id, slow, engine, queue) == "cancelled"
    t.join()
    assert time.monotonic() - started < 10  # well before the 30 s delay ran out
    job = get_job(engine, job_id)
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None


def test_bad_spec_fails_readably(engine, settings, queue, tmp_path):
    tenant, model_id = add_model(engine, settings, tiny_checkpoint(tmp_path / "m.safetensors"))
    job_id = add_job(engine, tenant, model_id, advanced={"no_such_knob": 1})
    assert execute_job(job_id, settings, engine, queue) == "failed"
    job = get_job(engine, job_id)
    assert job.error and "no_such_knob" in job.error


def test_progress_writes_are_throttled_and_fenced(engine, settings, queue, tmp_path):
    from worker.leases import LeaseLost, claim

    tenant, model_id = add_model(engine, settings, tiny_checkpoint(tmp_path / "m.safetensors"))
    job_id = add_job(engine, tenant, model_id)
    assert claim(engine, job_id, "me", 30) is not None
    now = [0.0]
    writer = ProgressWriter(engine, job_id, "me", settings, clock=lambda: now[0])
    for i in range(100):  # 100 reports within 0.1 s of fake time, one stage
        now[0] = i * 0.001
        writer("compress", i / 100)
    assert writer.writes == 1
    now[0] = 10.0
    writer("compress", 0.5)
    job = get_job(engine, job_id)
    assert writer.writes == 2 and job.percent == 50.0 and job.eta_s == pytest.approx(10.0)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(lease_owner="someone-else"))
    now[0] = 20.0
    with pytest.raises(LeaseLost):
        writer("export", 0.9)
