"""End-to-end fixtures: uvicorn and real Celery worker processes on the test database."""
# ruff: noqa: F811 - fixtures imported from tests.service_support are requested by name

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from app.core.config import Settings
from tests.service_support import (  # noqa: F401 - fixtures
    RUN_ID,
    database_url,
    engine,
    make_key,
    queue,
    settings,
)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(settings: Settings, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNC_")}
    env.update(
        {
            "CNC_ENVIRONMENT": settings.environment,
            "CNC_SECRET_KEY": settings.secret_key,
            "CNC_DATABASE_URL": settings.database_url,
            "CNC_BROKER_URL": settings.broker_url,
            "CNC_QUEUE_PREFIX": settings.queue_prefix,
            "CNC_LEASE_TTL_S": str(settings.lease_ttl_s),
            "CNC_HEARTBEAT_S": str(settings.heartbeat_s),
            "CNC_REAPER_INTERVAL_S": str(settings.reaper_interval_s),
            "CNC_PROGRESS_MIN_INTERVAL_S": str(settings.progress_min_interval_s),
            "CNC_SSE_POLL_S": str(settings.sse_poll_s),
            "CNC_AUTH_CACHE_TTL_S": "0",
            "CNC_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
            "CNC_CALLBACK_ALLOWED_HOSTS": ",".join(settings.callback_allowed_hosts),
            "CNC_CALLBACK_BACKOFF_S": "0.2",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Stack:
    """Processes of one test: the API and any number of workers, stopped at the end."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start_api(self) -> str:
        port = free_port()
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            service_env(self.settings),
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if self.procs["api"].poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("the API did not start:\n" + self.log("api"))

    def start_worker(self, name: str, **env: Any) -> subprocess.Popen[bytes]:
        s = self.settings
        proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "-Q",
                f"{s.job_queue},{s.light_queue}",
                "-n",
                f"{name}-{RUN_ID}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            service_env(s, **env),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "ready." in self.log(name):
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} did not start:\n" + self.log(name))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def stack(settings: Settings, engine: Engine, queue: Any, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(settings, tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """The tiny CNN of the e2e tests, as safetensors (about 20 KB)."""
    from tests.worker.helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path / "model.safetensors")
