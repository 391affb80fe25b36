"""The claim on a job row: who runs it, until when, and what happens when a worker dies.

A worker *claims* a queued job with one conditional UPDATE, so two deliveries of the same
task never both run it. The claim is a lease renewed by a heartbeat; every write of
progress or results is *fenced* on the lease owner, so a worker that lost its lease can
no longer change the job. A reaper in every worker puts jobs whose lease lapsed back on the
queue (up to ``max_attempts``), or ends them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Engine, and_, func, or_, select, update

from app.db.models import CallbackStatus, Job, JobStatus
from app.queue import JobQueue

log = logging.getLogger(__name__)


class LeaseLost(Exception):  # noqa: N818 - reads as the condition
    """Another worker owns the job now (or it was ended elsewhere): stop without writing."""


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_pid(owner: str | None) -> int | None:
    """The process id recorded in a lease owner (tests kill it)."""
    try:
        return int((owner or "").split(":")[1])
    except (IndexError, ValueError):
        return None


def _lease_until(ttl_s: float) -> object:
    return func.now() + timedelta(seconds=ttl_s)


@dataclass
class Claim:
    job_id: uuid.UUID
    owner: str
    attempt: int
    spec: dict[str, object]
    model_id: uuid.UUID


def claim(engine: Engine, job_id: uuid.UUID, owner: str, ttl_s: float) -> Claim | None:
    """Take a queued job; None when it is not queued (done, cancelled, or someone has it)."""
    with engine.begin() as conn:
        row = conn.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.QUEUED,
                Job.cancel_requested.is_(False),
                Job.attempt < Job.max_attempts,
            )
            .values(
                status=JobStatus.RUNNING,
                stage="starting",
                percent=0.0,
                eta_s=None,
                lease_owner=owner,
                lease_expires_at=_lease_until(ttl_s),
                attempt=Job.attempt + 1,
                started_at=func.coalesce(Job.started_at, func.now()),
            )
            .returning(Job.attempt, Job.spec, Job.model_id)
        ).one_or_none()
    if row is None:
        return None
    return Claim(job_id, owner, row.attempt, dict(row.spec), row.model_id)


def renew(engine: Engine, job_id: uuid.UUID, owner: str, ttl_s: float) -> bool | None:
    """Extend the lease. Returns ``cancel_requested``, or None when the lease is lost."""
    with engine.begin() as conn:
        row = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
            .values(lease_expires_at=_lease_until(ttl_s))
            .returning(Job.cancel_requested)
        ).one_or_none()
    return None if row is None else bool(row.cancel_requested)


@dataclass
class Heartbeat:
    """Renews the lease from a thread while the job computes; flags loss or cancellation."""

    engine: Engine
    job_id: uuid.UUID
    owner: str
    ttl_s: float
    interval_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="cnc-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                state = renew(self.engine, self.job_id, self.owner, self.ttl_s)
            except Exception:  # noqa: BLE001 - a DB blip: retry at the next beat
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)
                continue
            if state is None:
                self.lost.set()
                return
            if state:
                self.cancel.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass(frozen=True)
class ReapResult:
    requeued: list[uuid.UUID]
    ended: list[uuid.UUID]  # jobs the reaper ended (attempts exhausted or cancelled)
    resent: list[uuid.UUID]  # queued jobs whose broker message may be lost


def reap(engine: Engine, queue: JobQueue, resend_after_s: float) -> ReapResult:
    """Deal with lapsed leases: requeue, or end as failed/cancelled; resend stale queued jobs.

    Safe to run from many workers at once: each UPDATE re-checks its condition under the
    row lock, so a job is requeued once.
    """
    lapsed = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < func.now())
    with engine.begin() as conn:
        cancelled = (
            conn.execute(
                update(Job)
                .where(lapsed, Job.cancel_requested.is_(True))
                .values(
                    status=JobStatus.CANCELLED,
                    stage="cancelled",
                    finished_at=func.now(),
                    lease_owner=None,
                    lease_expires_at=None,
                    eta_s=None,
                )
                .returning(Job.id)
            )
            .scalars()
            .all()
        )
        failed = (
            conn.execute(
                update(Job)
                .where(lapsed, Job.attempt >= Job.max_attempts)
                .values(
                    status=JobStatus.FAILED,
                    stage="failed",
                    finished_at=func.now(),
                    lease_owner=None,
                    lease_expires_at=None,
                    eta_s=None,
                    error_code="worker_lost",
                    error=func.concat(
                        "the worker running this job stopped responding ", Job.attempt, " times"
                    ),
                )
                .returning(Job.id)
            )
            .scalars()
            .all()
        )
        requeued = conn.execute(
            update(Job)
            .where(lapsed)
            .values(
                status=JobStatus.QUEUED,
                stage="requeued",
                percent=0.0,
                eta_s=None,
                lease_owner=None,
                lease_expires_at=None,
                enqueued_at=func.now(),
                task_id=func.gen_random_uuid().cast(Job.task_id.type),
            )
            .returning(Job.id, Job.task_id)
        ).all()
        resent = conn.execute(
            update(Job)
            .where(
                Job.status == JobStatus.QUEUED,
                or_(
                    Job.enqueued_at.is_(None),
                    Job.enqueued_at < func.now() - timedelta(seconds=resend_after_s),
                ),
            )
            .values(enqueued_at=func.now())
            .returning(Job.id, Job.task_id)
        ).all()
    for job_id, task_id in [*requeued, *resent]:
        log.warning("re-sending job %s to the queue", job_id)
        queue.enqueue_job(job_id, task_id)
    ended = [*cancelled, *failed]
    with engine.connect() as conn:
        with_callbacks = (
            conn.execute(
                select(Job.id).where(
                    Job.id.in_(ended), Job.callback_status == CallbackStatus.PENDING
                )
            )
            .scalars()
            .all()
            if ended
            else []
        )
    for job_id in with_callbacks:
        queue.enqueue_callback(job_id)
    return ReapResult([r[0] for r in requeued], ended, [r[0] for r in resent])


class Reaper:
    """Runs :func:`reap` every ``interval_s`` in a daemon thread of a worker process."""

    def __init__(
        self, engine: Engine, queue: JobQueue, interval_s: float, resend_after_s: float
    ) -> None:
        self.engine, self.queue = engine, queue
        self.interval_s, self.resend_after_s = interval_s, resend_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cnc-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reap(self.engine, self.queue, self.resend_after_s)
            except Exception:  # noqa: BLE001 - keep reaping after a DB or broker blip
                log.warning("reaper pass failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
