"""The Celery application object shared by the API (to enqueue) and the workers (to run).

Tasks are sent by NAME with JSON arguments, so this module imports no task code and no
torch. The API enqueues only after its transaction commits: a worker never sees a job id
the database does not hold yet.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery

from app.core.config import Settings

TASK_RUN_JOB = "cnc.run_job"
TASK_VALIDATE_MODEL = "cnc.validate_model"
TASK_DELIVER_CALLBACK = "cnc.deliver_callback"

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for long, GPU-bound, at-least-once jobs."""
    app = Celery("cnc", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the job row is the truth, not a result backend
        # A task is acknowledged only when it returns, and a worker takes one at a time:
        # a worker that dies mid-job leaves its task to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers unacknowledged tasks after this; above the longest job.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        task_default_queue=settings.light_queue,
        task_routes={TASK_RUN_JOB: {"queue": settings.job_queue}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


class JobQueue:
    """Enqueue, revoke and inspect; a thin facade over Celery for the API and the reaper."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self.celery = celery or make_celery(settings)

    def enqueue_job(self, job_id: uuid.UUID | str, task_id: str | None = None) -> str:
        task_id = task_id or str(uuid.uuid4())
        self.celery.send_task(
            TASK_RUN_JOB, args=[str(job_id)], task_id=task_id, queue=self.settings.job_queue
        )
        return task_id

    def enqueue_validation(self, model_id: uuid.UUID | str) -> None:
        self.celery.send_task(
            TASK_VALIDATE_MODEL, args=[str(model_id)], queue=self.settings.light_queue
        )

    def enqueue_callback(
        self, job_id: uuid.UUID | str, attempt: int = 1, countdown: float = 0.0
    ) -> None:
        self.celery.send_task(
            TASK_DELIVER_CALLBACK,
            args=[str(job_id), attempt],
            countdown=countdown or None,
            queue=self.settings.light_queue,
        )

    def revoke(self, task_id: str) -> None:
        """Drop a task not yet started (best effort; the job row decides anyway)."""
        try:
            self.celery.control.revoke(task_id)
        except Exception:  # noqa: BLE001 - a revoke is an optimisation only
            log.warning("revoke of %s failed", task_id, exc_info=True)

    def depth(self) -> dict[str, int]:
        """Tasks waiting per queue (Redis lists named after the queues)."""
        queues = (self.settings.job_queue, self.settings.light_queue)
        with self.celery.connection_for_read() as conn:
            client: Any = conn.default_channel.client
            return {q: int(client.llen(q)) for q in queues}

    def ping(self) -> bool:
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            client: Any = conn.default_channel.client
            return bool(client.ping())
