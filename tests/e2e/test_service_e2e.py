"""End to end over HTTP, with uvicorn and real Celery worker processes.

Upload a tiny model, submit, poll to success, download and load the compact model and its
ONNX twin, open the PNG; cancel; kill -9 of a worker mid-job with a second one finishing it.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Artifact, Job
from tests.e2e.conftest import Stack
from tests.service_support import BASE_SPEC, bearer
from worker.leases import owner_pid

pytestmark = pytest.mark.slow


def wait_for(
    client: httpx.Client, job_id: str, states: set[str], timeout: float = 120, **match: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in states and all(job.get(k) == v for k, v in match.items()):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {states} {match}: {job}")


def submit(client: httpx.Client, model: Path, **spec: Any) -> dict[str, Any]:
    r = client.post("/v1/models", files={"file": ("model.safetensors", model.read_bytes())})
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json={**BASE_SPEC, "model_id": r.json()["id"], **spec})
    assert r.status_code == 202, r.text
    return r.json()


def test_upload_submit_poll_download(stack: Stack, make_key, tiny_model: Path, tmp_path: Path):
    import numpy as np
    import onnxruntime as ort
    import torch
    from PIL import Image

    from cnc_core.export import load_compact

    url = stack.start_api()
    stack.start_worker("w1")
    with httpx.Client(base_url=url, headers=bearer(make_key()), timeout=30) as client:
        job = submit(client, tiny_model)
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            text = "".join(events.iter_text())  # ends with the terminal state
        assert "event: progress" in text and "event: end" in text
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})
        assert done["status"] == "succeeded", done
        assert done["device"] == "cpu" and done["percent"] == 100
        assert done["metrics"]["ratios"]["param ratio"] > 1.2
        names = {a["name"] for a in done["artifacts"]}
        assert {
            "model.safetensors",
            "manifest.json",
            "model.onnx",
            "report.json",
            "plots/spectra.png",
            "plots/summary.png",
        } <= names
        out = tmp_path / "download"
        (out / "plots").mkdir(parents=True)
        for artifact in done["artifacts"]:
            r = client.get(artifact["url"])
            assert r.status_code == 200
            assert r.headers["etag"] == f'"{artifact["sha256"]}"'
            (out / artifact["name"]).write_bytes(r.content)
        part = client.get(done["artifacts"][0]["url"], headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and len(part.content) == 10
        report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
        assert report["job"]["method"] == "compress"

    compact = load_compact(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = compact(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    with Image.open(io.BytesIO((out / "plots/spectra.png").read_bytes())) as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_cancel_running_job(stack: Stack, make_key, tiny_model: Path):
    url = stack.start_api()
    stack.start_worker("w1", CNC_JOB_START_DELAY_S=60)
    with httpx.Client(base_url=url, headers=bearer(make_key()), timeout=30) as client:
        job = submit(client, tiny_model)
        wait_for(client, job["id"], {"running"}, stage="prepare", timeout=60)
        started = time.monotonic()
        r = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202
        done = wait_for(client, job["id"], {"cancelled", "succeeded", "failed"}, timeout=30)
        assert done["status"] == "cancelled"
        assert time.monotonic() - started < 15
    assert stack.procs["w1"].poll() is None  # the worker lives on for the next job


def test_kill_9_mid_job_another_worker_finishes(stack: Stack, make_key, tiny_model: Path, engine):
    url = stack.start_api()
    stack.start_worker("w1", CNC_JOB_START_DELAY_S=4)
    stack.start_worker("w2", CNC_JOB_START_DELAY_S=4)
    with httpx.Client(base_url=url, headers=bearer(make_key()), timeout=30) as client:
        job = submit(client, tiny_model)
        wait_for(client, job["id"], {"running"}, stage="prepare", timeout=60)
        with Session(engine) as s:
            first_owner = s.get(Job, job["id"]).lease_owner
        pid = owner_pid(first_owner)
        victim = next(n for n, p in stack.procs.items() if p.pid == pid)
        os.kill(pid, signal.SIGKILL)
        stack.procs[victim].wait(timeout=10)
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=150)
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 2
    survivor = "w2" if victim == "w1" else "w1"
    assert "claimed by" in stack.log(survivor)
    with Session(engine) as s:
        artifacts = s.scalars(select(Artifact.name).where(Artifact.job_id == job["id"])).all()
    assert len(artifacts) == len(set(artifacts)) > 0  # stored once


def test_hard_time_limit_kills_a_hung_worker(
    stack: Stack, engine, settings, queue, tiny_model: Path
):
    """A job hung without progress reports (so the soft limit never runs) is ended by the
    hard limit: the worker process is SIGKILLed, the job ends failed/time_limit, and a
    redelivery of its task to a fresh worker does not run it again."""
    from tests.worker.helpers import add_job, add_model, get_job

    tenant, model_id = add_model(engine, settings, tiny_model)
    job_id = add_job(engine, tenant, model_id)
    hung = stack.start_worker(
        "w1",
        CNC_JOB_SOFT_TIME_LIMIT_S=1,
        CNC_JOB_HARD_TIME_LIMIT_S=2,
        CNC_JOB_START_DELAY_S=120,
        CNC_JOB_START_DELAY_BLOCKING="true",
    )
    task_id = get_job(engine, job_id).task_id
    assert task_id is not None
    queue.enqueue_job(job_id, task_id)
    assert hung.wait(timeout=60) == -signal.SIGKILL
    job = get_job(engine, job_id)
    assert job.status == "failed" and job.error_code == "time_limit" and job.attempt == 1
    stack.start_worker("w2")
    queue.enqueue_job(job_id)  # as Redis would redeliver the unacknowledged task
    deadline = time.monotonic() + 30
    while "not claimable" not in stack.log("w2") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not claimable" in stack.log("w2")
    job = get_job(engine, job_id)
    assert job.status == "failed" and job.error_code == "time_limit" and job.attempt == 1
