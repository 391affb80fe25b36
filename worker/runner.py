"""One job, end to end, on a worker: claim, fetch, validate, run ``cnc_core``, store.

The Celery task is a thin call into :func:`execute_job`; this module holds the logic so
tests can drive it without a broker.
"""

from __future__ import annotations

import gc
import logging
import mimetypes
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.blobs import write_file
from app.db.models import Artifact, CallbackStatus, Job, JobStatus, Model, ModelStatus
from app.queue import JobQueue
from worker import validation
from worker.leases import Claim, Heartbeat, LeaseLost, claim, new_owner

log = logging.getLogger(__name__)

# Overall progress: the library's 0..1 maps into [RUN_START, RUN_END]; the rest is ours.
RUN_START, RUN_END = 0.03, 0.97
SPEC_ONLY_FIELDS = {"model_id", "callback_url"}


class JobFailure(Exception):
    """A failure with a code the user can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TimeLimitExceeded(Exception):  # noqa: N818
    """The job ran past its soft time limit."""


def kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class HardLimit:
    """The hard time limit, enforced for real under ``--pool=solo``.

    Celery's ``task_time_limit`` needs a pool that can kill a child; with the solo pool the
    job runs in the worker's main thread, where only the soft limit (checked at progress
    reports) applies, and a job stuck in native code would never end. This watchdog thread
    waits ``limit_s`` from the claim; if the job is still running then, it records the job
    ``failed`` with code ``time_limit`` (fenced on the lease, so a job that just ended or
    moved to another worker is left alone), queues its callback, and SIGKILLs the process:
    the computation stops, the GPU is freed, and the worker's supervisor (compose
    ``restart``, systemd, ``make serve``) starts a fresh one. The unacknowledged task comes
    back after the visibility timeout and is skipped, since the job is no longer queued.
    Should the database be unreachable, the lease lapses and the reaper requeues the job,
    at most ``max_attempts`` times in all.
    """

    engine: Engine
    claim: Claim
    queue: JobQueue
    limit_s: float
    kill: Callable[[], None] = kill_this_process
    fired: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> HardLimit:
        threading.Thread(target=self._run, name="cnc-hard-limit", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self._stop.wait(self.limit_s):
            return
        self.fired.set()
        log.error(
            "job %s ran past its hard time limit of %.0f s; killing the worker",
            self.claim.job_id,
            self.limit_s,
        )
        recorder = threading.Thread(target=self._record, name="cnc-hard-limit-record", daemon=True)
        recorder.start()
        recorder.join(timeout=10)  # a hung database must not keep the job alive
        if not self._stop.is_set():  # the job did not end meanwhile
            self.kill()

    def _record(self) -> None:
        message = f"the job ran past its hard time limit of {self.limit_s:.0f} s and was killed"
        try:
            if store_end(
                self.engine,
                self.claim,
                JobStatus.FAILED,
                "time_limit",
                message,
                {"total": self.limit_s},
            ):
                enqueue_pending_callback(self.engine, self.queue, self.claim.job_id)
        except Exception:  # noqa: BLE001 - kill anyway; the reaper ends the job later
            log.warning(
                "could not record the time limit of job %s", self.claim.job_id, exc_info=True
            )


@dataclass
class ProgressWriter:
    """The ``progress(stage, fraction)`` callback handed to ``cnc_core``.

    Writes stage, percent and ETA to the job row, at most every ``min_interval_s`` (and on
    every stage change), fenced on the lease; raises ``Cancelled`` when a cancel was
    requested and ``LeaseLost`` when another worker owns the job now.
    """

    engine: Engine
    job_id: uuid.UUID
    owner: str
    settings: Settings
    heartbeat: Heartbeat | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.t0 = self.clock()
        self._last_write = float("-inf")
        self._stage = ""
        self.stage_started: dict[str, float] = {}
        self.writes = 0

    def __call__(self, stage: str, fraction: float) -> None:
        from cnc_core.progress import Cancelled

        now = self.clock()
        if self.heartbeat is not None:
            if self.heartbeat.lost.is_set():
                raise LeaseLost(str(self.job_id))
            if self.heartbeat.cancel.is_set():
                raise Cancelled()
        if now - self.t0 > self.settings.job_soft_time_limit_s:
            raise TimeLimitExceeded(
                f"the job ran past its time limit of {self.settings.job_soft_time_limit_s} s"
            )
        changed = stage != self._stage
        if changed:
            self.stage_started.setdefault(stage, now)
            self._stage = stage
        if not changed and now - self._last_write < self.settings.progress_min_interval_s:
            return
        self._last_write = now
        fraction = min(max(fraction, 0.0), 1.0)
        elapsed = now - self.t0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        with self.engine.begin() as conn:
            row = conn.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.lease_owner == self.owner,
                    Job.status == JobStatus.RUNNING,
                )
                .values(
                    stage=stage[:64],
                    percent=round(100 * fraction, 2),
                    eta_s=eta,
                    lease_expires_at=func.now() + _ttl(self.settings),
                )
                .returning(Job.cancel_requested)
            ).one_or_none()
        self.writes += 1
        if row is None:
            raise LeaseLost(str(self.job_id))
        if row.cancel_requested:
            raise Cancelled()

    def scaled(self, start: float, end: float) -> Callable[[str, float], None]:
        """A callback mapping a sub-task's 0..1 onto ``[start, end]`` of the whole job."""
        return lambda stage, fraction: self(stage, start + (end - start) * fraction)


def _ttl(settings: Settings) -> Any:
    from datetime import timedelta

    return timedelta(seconds=settings.lease_ttl_s)


def job_config_kwargs(spec: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The spec fields that ``JobConfig`` takes (the API adds model_id and callback_url)."""
    return {k: v for k, v in spec.items() if k in names and k not in SPEC_ONLY_FIELDS}


def content_type(name: str) -> str:
    if name.endswith(".json"):
        return "application/json"
    if name.endswith(".md"):
        return "text/markdown; charset=utf-8"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def store_success(
    engine: Engine, settings: Settings, c: Claim, result: Any, extra_timings: dict[str, float]
) -> None:
    """Artifacts and the final row in one transaction, fenced on the lease owner."""
    with Session(engine) as session, session.begin():
        job = session.scalars(select(Job).where(Job.id == c.job_id).with_for_update()).one()
        if job.lease_owner != c.owner or job.status != JobStatus.RUNNING:
            raise LeaseLost(str(c.job_id))
        for name, path in sorted(result.artifacts.items()):
            blob = write_file(session, Path(path), settings.blob_chunk_bytes)
            session.add(
                Artifact(
                    job_id=job.id,
                    name=name,
                    blob_id=blob.id,
                    content_type=content_type(name),
                    size=blob.size,
                    sha256=blob.sha256,
                )
            )
        report = result.report if isinstance(result.report, dict) else {}
        timings = dict(report.get("timings_s") or {}) if isinstance(report, dict) else {}
        timings.update(extra_timings)
        job.status = JobStatus.SUCCEEDED
        job.stage = "done"
        job.percent = 100.0
        job.eta_s = 0.0
        job.device = str(result.device)[:128]
        job.report = report
        job.suspected_target = result.suspected_target
        job.timings = timings
        job.finished_at = func.now()
        job.lease_owner = None
        job.lease_expires_at = None


def store_end(
    engine: Engine,
    c: Claim,
    status: JobStatus,
    code: str | None,
    message: str | None,
    timings: dict[str, float],
) -> bool:
    """Record a failed or cancelled end; False when the lease was lost meanwhile."""
    with engine.begin() as conn:
        row = conn.execute(
            update(Job)
            .where(Job.id == c.job_id, Job.lease_owner == c.owner, Job.status == JobStatus.RUNNING)
            .values(
                status=status,
                stage=str(status),
                error_code=code,
                error=message,
                eta_s=None,
                finished_at=func.now(),
                lease_owner=None,
                lease_expires_at=None,
                timings=timings,
            )
            .returning(Job.id)
        ).one_or_none()
    return row is not None


def free_accelerator_memory() -> None:
    """Drop cached GPU memory after a job, so the next one (or another process) gets it."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - workers always have torch
        pass


def execute_job(
    job_id: uuid.UUID | str,
    settings: Settings,
    engine: Engine,
    queue: JobQueue,
    owner: str | None = None,
    kill: Callable[[], None] = kill_this_process,
) -> str:
    """Run one job if it can be claimed. Returns the job's final status, or ``skipped``
    (not claimable: already done, cancelled, or running elsewhere) or ``lease_lost``.

    ``kill`` ends the process at the hard time limit (see :class:`HardLimit`)."""
    from cnc_core.io import CheckpointError
    from cnc_core.job import JobConfig, run_job
    from cnc_core.progress import Cancelled

    job_id = uuid.UUID(str(job_id))
    owner = owner or new_owner()
    c = claim(engine, job_id, owner, settings.lease_ttl_s)
    if c is None:
        log.info("job %s is not claimable; skipping this delivery", job_id)
        return "skipped"
    log.info("job %s claimed by %s (attempt %d)", job_id, owner, c.attempt)
    watchdog = HardLimit(engine, c, queue, settings.job_hard_time_limit_s, kill).start()
    heartbeat = Heartbeat(engine, job_id, owner, settings.lease_ttl_s, settings.heartbeat_s)
    heartbeat.start()
    progress = ProgressWriter(engine, job_id, owner, settings, heartbeat)
    timings: dict[str, float] = {}
    status: JobStatus | None = None
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=settings.work_dir, prefix="cnc-job-") as tmp:
            work = Path(tmp)
            progress("download", 0.0)
            t0 = time.perf_counter()
            with Session(engine) as session:
                model = session.get(Model, c.model_id)
                if model is None:
                    raise JobFailure("model_missing", f"model {c.model_id} no longer exists")
            checkpoint = validation.fetch_checkpoint(engine, model, work)
            timings["download"] = time.perf_counter() - t0
            _test_delay(progress, settings.job_start_delay_s, settings.job_start_delay_blocking)
            progress("validate", 0.02)
            try:
                summary = validation.summarize(checkpoint)
            except CheckpointError as exc:
                validation.record(engine, model.id, None, str(exc))
                raise JobFailure("invalid_checkpoint", str(exc)) from None
            if model.status == ModelStatus.PENDING:
                validation.record(engine, model.id, summary, None)
            names = {f.name for f in fields(JobConfig)}
            try:
                config = JobConfig.from_dict(job_config_kwargs(c.spec, names))
            except (TypeError, ValueError) as exc:
                raise JobFailure("invalid_spec", str(exc)) from None
            t0 = time.perf_counter()
            result = run_job(
                checkpoint, work / "out", config, progress=progress.scaled(RUN_START, RUN_END)
            )
            timings["run"] = time.perf_counter() - t0
            progress("store", RUN_END)
            timings["total"] = time.perf_counter() - t_start
            store_success(engine, settings, c, result, timings)
            status = JobStatus.SUCCEEDED
    except Cancelled:
        status = JobStatus.CANCELLED
        timings["total"] = time.perf_counter() - t_start
        if not store_end(engine, c, status, None, None, timings):
            status = None
    except LeaseLost:
        log.warning("job %s: lease lost; another worker owns it now", job_id)
        status = None
    except TimeLimitExceeded as exc:
        status = JobStatus.FAILED
        if not store_end(engine, c, status, "time_limit", str(exc), timings):
            status = None
    except JobFailure as exc:
        status = JobStatus.FAILED
        if not store_end(engine, c, status, exc.code, str(exc), timings):
            status = None
    except (CheckpointError, ValueError, TypeError, KeyError) as exc:
        # The library rejects bad specs (unknown arch, unknown advanced knob) this way.
        status = JobStatus.FAILED
        if not store_end(
            engine, c, status, "invalid_input", f"{type(exc).__name__}: {exc}", timings
        ):
            status = None
    except Exception as exc:  # noqa: BLE001 - record any failure on the row
        log.exception("job %s failed", job_id)
        status = JobStatus.FAILED
        if not store_end(
            engine, c, status, "internal_error", f"{type(exc).__name__}: {exc}", timings
        ):
            status = None
    finally:
        watchdog.stop()
        heartbeat.stop()
        free_accelerator_memory()
    if status is None:
        return "lease_lost"
    enqueue_pending_callback(engine, queue, job_id)
    log.info("job %s ended %s", job_id, status)
    return str(status)


def enqueue_pending_callback(engine: Engine, queue: JobQueue, job_id: uuid.UUID) -> None:
    """Queue the delivery of an ended job's callback, if it has one still pending."""
    with engine.connect() as conn:
        pending = (
            conn.execute(select(Job.callback_status).where(Job.id == job_id)).scalar_one()
            == CallbackStatus.PENDING
        )
    if pending:
        try:
            queue.enqueue_callback(job_id)
        except Exception:  # noqa: BLE001 - the job result stands; log the lost callback
            log.warning("could not enqueue the callback of job %s", job_id, exc_info=True)


def _test_delay(
    progress: Callable[[str, float], None], seconds: float, blocking: bool = False
) -> None:
    """Test-only slow start (``CNC_JOB_START_DELAY_S``), reporting progress as it waits,
    or, when ``blocking``, silent like a hung native call (for the hard time limit)."""
    if seconds <= 0:
        return
    if blocking:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        progress("prepare", 0.01 + 0.01 * (1 - left / seconds))
        time.sleep(min(0.1, left))
