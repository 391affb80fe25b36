"""Fixtures and helpers for the service tests (tests/api, tests/worker, tests/e2e).

Tests run against the machine's real PostgreSQL (127.0.0.1:5432) and Redis
(127.0.0.1:6379). Each test run creates its own database (migrated from empty) and its own
queue names; each test starts from empty tables. When a server is unreachable the tests
are skipped with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from app.cli import create_key
from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.session import get_engine
from app.queue import JobQueue

PG_ADMIN_URL = os.environ.get("CNC_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:10]
TABLES = ("artifacts", "jobs", "batches", "models", "blob_chunks", "blobs", "api_keys", "tenants")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_services() -> None:
    """Skip (or, under CI, fail) when PostgreSQL or Redis does not answer."""
    missing = [
        name
        for name, port in (("PostgreSQL", 5432), ("Redis", 6379))
        if not _reachable("127.0.0.1", port)
    ]
    if missing:
        reason = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: service tests must run)")
        pytest.skip(reason)


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this test run, migrated to head; dropped afterwards."""
    require_services()
    name = f"cnc_test_{RUN_ID}"
    url = create_database(name)
    upgrade(url)
    yield url
    get_engine(url, 10, 20).dispose()
    drop_database(name)


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "secret_key": "test-secret-" + RUN_ID,
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "queue_prefix": f"cnc-test-{RUN_ID}",
        "auth_cache_ttl_s": 0.0,
        "lease_ttl_s": 3.0,
        "heartbeat_s": 0.5,
        "reaper_interval_s": 0.5,
        "progress_min_interval_s": 0.2,
        "sse_poll_s": 0.1,
        "callback_backoff_s": 0.2,
        "callback_allowed_hosts": ["127.0.0.1", "hooks.example.com"],
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = get_engine(settings.database_url, 10, 20)
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))


@pytest.fixture
def queue(settings: Settings) -> Iterator[JobQueue]:
    q = JobQueue(settings)
    yield q
    purge_queues(q)


def purge_queues(q: JobQueue) -> None:
    with q.celery.connection_for_write() as conn:
        client: Any = conn.default_channel.client
        for name in (q.settings.job_queue, q.settings.light_queue):
            client.delete(name)


def queued_tasks(q: JobQueue, name: str | None = None) -> list[dict[str, Any]]:
    """The tasks waiting in a queue, as ``{"task": name, "args": [...]}`` (oldest first)."""
    with q.celery.connection_for_read() as conn:
        client: Any = conn.default_channel.client
        raw = client.lrange(name or q.settings.job_queue, 0, -1)
    out = []
    for item in reversed(raw):  # kombu LPUSHes and BRPOPs
        message = json.loads(item)
        body = json.loads(__import__("base64").b64decode(message["body"]))
        out.append(
            {"task": message["headers"]["task"], "args": body[0], "id": message["headers"]["id"]}
        )
    return out


@pytest.fixture
def make_key(engine: Engine, settings: Settings) -> Any:
    """``make_key("acme") -> "cnc_..."``: a key for a tenant (created on first use)."""

    def make(tenant: str = "acme") -> str:
        return create_key(engine, settings, tenant).token

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def safetensors_bytes(tensors: dict[str, tuple[list[int], bytes]] | None = None) -> bytes:
    """A valid safetensors file built by hand (float32), so API tests need no torch."""
    tensors = tensors or {"w": ([2, 2], struct.pack("<4f", 1, 2, 3, 4))}
    header: dict[str, Any] = {}
    blobs = b""
    for name, (shape, data) in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [len(blobs), len(blobs) + len(data)],
        }
        blobs += data
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blobs


BASE_SPEC: dict[str, Any] = {
    "arch": "simple_cnn",
    "num_classes": 10,
    "in_chans": 3,
    "input_size": 32,
    "width": 8,
    "method": "compress",
    "ratio": 1.5,
    "mean": [0.5],
    "std": [0.25],
    "device": "cpu",
    "advanced": {"measure_latency": False},
}
