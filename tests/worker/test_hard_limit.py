"""The hard time limit under the solo pool: a watchdog records ``time_limit`` and kills."""

from __future__ import annotations

import threading
import time

from app.db.models import JobStatus
from tests.service_support import make_settings, queued_tasks
from tests.worker.helpers import add_job, add_model, get_job, tiny_checkpoint
from worker.leases import claim
from worker.runner import HardLimit, execute_job


def test_hung_job_is_failed_with_time_limit_and_killed(engine, settings, queue, tmp_path):
    tenant, model_id = add_model(engine, settings, tiny_checkpoint(tmp_path / "m.safetensors"))
    job_id = add_job(engine, tenant, model_id, callback_url="http://127.0.0.1:9/hook")
    slow = make_settings(
        settings.database_url,
        job_soft_time_limit_s=0.5,
        job_hard_time_limit_s=1.0,
        job_start_delay_s=3.0,
        job_start_delay_blocking=True,
    )
    killed = threading.Event()
    result: dict[str, str] = {}
    start = time.monotonic()
    runner = threading.Thread(
        target=lambda: result.update(
            status=execute_job(job_id, slow, engine, queue, kill=killed.set)
        )
    )
    runner.start()
    # The job sleeps 3 s without a progress report, so the soft limit never gets a say.
    assert killed.wait(10), "the watchdog never fired"
    assert 0.9 < time.monotonic() - start < 2.5
    job = get_job(engine, job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "time_limit"
    assert "hard time limit" in (job.error or "") and job.lease_owner is None
    light = queued_tasks(queue, settings.light_queue)
    assert light[-1]["task"] == "cnc.deliver_callback" and light[-1]["args"][0] == str(job_id)
    # Had the kill not happened, the job thread wakes up and finds it no longer owns the job:
    # nothing overwrites the recorded failure.
    runner.join(15)
    assert result["status"] == "lease_lost"
    job = get_job(engine, job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "time_limit"


def test_watchdog_stays_quiet_when_the_job_ends_in_time(engine, settings, queue, tmp_path):
    tenant, model_id = add_model(engine, settings, tiny_checkpoint(tmp_path / "m.safetensors"))
    job_id = add_job(engine, tenant, model_id)
    c = claim(engine, job_id, "test:1:x", 30)
    assert c is not None
    killed = threading.Event()
    watchdog = HardLimit(engine, c, queue, 0.3, kill=killed.set).start()
    watchdog.stop()
    time.sleep(0.6)
    assert not killed.is_set() and not watchdog.fired.is_set()
    assert get_job(engine, job_id).status == JobStatus.RUNNING
