"""Celery tasks: thin wrappers that look the job up by id and call the runner."""

from __future__ import annotations

import logging

from worker.celery_app import app, engine, queue, settings

log = logging.getLogger(__name__)


@app.task(name="cnc.run_job")
def run_job_task(job_id: str) -> str:
    from worker.runner import execute_job

    return execute_job(job_id, settings, engine(), queue)


@app.task(name="cnc.validate_model")
def validate_model_task(model_id: str) -> str:
    import uuid

    from worker.validation import validate_model

    return str(validate_model(engine(), uuid.UUID(model_id), settings.work_dir))


@app.task(name="cnc.deliver_callback")
def deliver_callback_task(job_id: str, attempt: int = 1) -> str:
    from worker.callbacks import deliver

    return str(deliver(engine(), settings, queue, job_id, attempt))
