"""Claims, fencing and the reaper: nothing runs twice, a dead worker's job comes back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from sqlalchemy import update

from app.db.models import Job, JobStatus
from tests.service_support import queued_tasks, safetensors_bytes
from tests.worker.helpers import add_job, add_model, get_job
from worker.leases import claim, owner_pid, reap, renew


def _job(engine, settings, tmp_path: Path) -> uuid.UUID:
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes())
    tenant, model = add_model(engine, settings, path)
    return add_job(engine, tenant, model)


def test_claim_once(engine, settings, tmp_path):
    job_id = _job(engine, settings, tmp_path)
    first = claim(engine, job_id, "host:1:a", 5)
    assert first is not None and first.attempt == 1
    assert claim(engine, job_id, "host:2:b", 5) is None  # a duplicate delivery is a no-op
    job = get_job(engine, job_id)
    assert job.status == JobStatus.RUNNING and job.lease_owner == "host:1:a"
    assert owner_pid(job.lease_owner) == 1
    assert renew(engine, job_id, "host:1:a", 5) is False
    assert renew(engine, job_id, "host:2:b", 5) is None  # fenced: not the owner


def test_cancelled_job_is_not_claimed(engine, settings, tmp_path):
    job_id = _job(engine, settings, tmp_path)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    assert claim(engine, job_id, "w", 5) is None


def test_reaper_requeues_a_lapsed_lease_then_gives_up(engine, settings, queue, tmp_path):
    job_id = _job(engine, settings, tmp_path)
    for attempt in range(1, settings.max_attempts + 1):
        assert claim(engine, job_id, f"dead:{attempt}:x", 0.05) is not None
        time.sleep(0.1)
        result = reap(engine, queue, resend_after_s=3600)
        job = get_job(engine, job_id)
        if attempt < settings.max_attempts:
            assert result.requeued == [job_id]
            assert job.status == JobStatus.QUEUED and job.lease_owner is None
            assert queued_tasks(queue)[-1]["args"] == [str(job_id)]
            assert queued_tasks(queue)[-1]["id"] == job.task_id
        else:
            assert result.ended == [job_id]
            assert job.status == JobStatus.FAILED and job.error_code == "worker_lost"
    # The fenced writer of a reaped lease can no longer touch the row.
    assert renew(engine, job_id, "dead:1:x", 5) is None


def test_reaper_leaves_live_leases_and_ends_cancelled(engine, settings, queue, tmp_path):
    live = _job(engine, settings, tmp_path)
    assert claim(engine, live, "alive", 60) is not None
    doomed = _job(engine, settings, tmp_path)
    assert claim(engine, doomed, "dead", 0.05) is not None
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == doomed).values(cancel_requested=True))
    time.sleep(0.1)
    result = reap(engine, queue, resend_after_s=3600)
    assert result.requeued == [] and result.ended == [doomed]
    assert get_job(engine, live).status == JobStatus.RUNNING
    assert get_job(engine, doomed).status == JobStatus.CANCELLED


def test_reaper_resends_jobs_whose_enqueue_failed(engine, settings, queue, tmp_path):
    job_id = _job(engine, settings, tmp_path)  # enqueued_at is NULL: never reached the broker
    result = reap(engine, queue, resend_after_s=3600)
    assert result.resent == [job_id]
    assert [t["args"] for t in queued_tasks(queue)] == [[str(job_id)]]
    assert reap(engine, queue, resend_after_s=3600).resent == []
