"""The worker's Celery app.

Run: ``celery -A worker.celery_app worker --pool=solo -Q cnc.jobs,cnc.light``.

One job at a time per worker process (``--pool=solo``; start one worker per GPU). The
process also runs a reaper thread that requeues jobs of workers that died.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from app.core.config import get_settings
from app.db.session import get_engine
from app.queue import JobQueue, make_celery

settings = get_settings()
app = make_celery(settings)
app.conf.update(include=["worker.tasks"])
queue = JobQueue(settings, app)
log = logging.getLogger(__name__)


def engine() -> Any:
    return get_engine(settings.database_url, 2, 2)


_reaper: Any = None


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _reaper
    from worker.leases import Reaper

    _reaper = Reaper(
        engine(),
        queue,
        settings.reaper_interval_s,
        resend_after_s=float(settings.visibility_timeout_s),
    ).start()
    log.info("reaper started (every %.1f s)", settings.reaper_interval_s)


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
