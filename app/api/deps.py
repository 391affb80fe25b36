"""Shared request dependencies as ``Annotated`` aliases: settings, DB session, tenant.

Dependencies that do no I/O are ``async`` so FastAPI calls them on the event loop rather
than hopping to the thread pool (a hop costs more than the work on a poll request).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.problems import Problem
from app.core.security import hash_key, parse_prefix
from app.db.models import ApiKey
from app.queue import JobQueue

log = logging.getLogger(__name__)

# Postgres channel on which the api_keys trigger (migration 0002) announces revocations.
KEYS_CHANNEL = "cnc_api_keys"


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


def get_db(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
SessionDep = Annotated[Session, Depends(get_db)]


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    prefix: str = ""


class AuthCache:
    """Recently verified keys, so a client polling every second costs no key lookup.

    Revocation is pushed, not waited out: migration 0002 makes Postgres ``NOTIFY`` on
    channel ``cnc_api_keys`` whenever a key is revoked or deleted (by the CLI, or by hand
    in SQL), and a listener thread in each API process drops that key from its cache, so a
    revoked key is refused within milliseconds by every API process. The ``ttl``
    (``CNC_AUTH_CACHE_TTL_S``) only bounds staleness should a notification be missed; the
    cache is emptied, and not filled, while the listener is not connected.

    Parameters
    ----------
    ttl : seconds a verified key is trusted without a lookup; 0 disables the cache.
    database_url : where to ``LISTEN``; None disables the cache's fill (tests without
        Postgres), since without the listener there is no way to hear of a revocation.
    """

    def __init__(self, ttl: float, database_url: str | None = None) -> None:
        self.ttl = ttl
        self.database_url = database_url
        self._items: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        # Bumped by every revocation notice: a lookup that began before a notice must not
        # cache its (possibly just revoked) answer after it.
        self.generation = 0
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, digest: str) -> Principal | None:
        item = self._items.get(digest)  # dict reads are atomic; no lock on the hot path
        if item is None:
            return None
        if item[0] < time.monotonic():
            with self._lock:
                self._items.pop(digest, None)
            return None
        return item[1]

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Cache a key verified by a lookup that began at ``generation``."""
        if self.ttl <= 0 or self.database_url is None:
            return
        self.start()
        if not self._listening.is_set():
            return  # a revocation could go unheard: do not trust the cache yet
        with self._lock:
            if generation != self.generation:
                return  # a revocation arrived during the lookup
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[digest] = (time.monotonic() + self.ttl, principal)

    def forget_prefix(self, prefix: str) -> None:
        """Drop every cached key with this prefix (the key was revoked)."""
        with self._lock:
            self.generation += 1
            for digest in [d for d, (_, p) in self._items.items() if p.prefix == prefix]:
                del self._items[digest]

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._items.clear()

    # The listener --------------------------------------------------------------------

    def start(self) -> None:
        """Start the LISTEN thread once (lazily, on the first verified key)."""
        if self._thread is not None or self.database_url is None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._listen_forever, name="cnc-auth-listener", daemon=True
                )
                self._thread.start()

    def wait_listening(self, timeout: float) -> bool:
        return self._listening.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _listen_forever(self) -> None:
        import psycopg

        from app.db.session import libpq_url

        assert self.database_url is not None
        while not self._stop.is_set():
            try:
                with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
                    conn.execute(f"LISTEN {KEYS_CHANNEL}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.forget_prefix(note.payload)
                        conn.execute("SELECT 1")  # notice a dead connection within a second
            except Exception:  # noqa: BLE001 - reconnect after any database error
                if not self._stop.is_set():
                    log.warning("auth-cache listener lost its connection", exc_info=True)
            finally:
                # Whatever was revoked while deaf is unknown: forget everything.
                self._listening.clear()
                self.clear()
            self._stop.wait(1.0)


_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def _lookup_key(engine: Engine, prefix: str, digest: str) -> Principal | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(ApiKey.id, ApiKey.tenant_id, ApiKey.key_hash).where(
                ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)
            )
        ).one_or_none()
    if row is None or row.key_hash != digest:
        return None
    return Principal(tenant_id=row.tenant_id, key_id=row.id, prefix=prefix)


async def current_principal(request: Request) -> Principal:
    """The caller's tenant. A cache hit costs one HMAC and no thread hop or query."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Problem(
            401, "missing API key: send 'Authorization: Bearer <key>'", headers=_UNAUTHORIZED
        )
    prefix = parse_prefix(token)
    if prefix is None:
        raise Problem(401, "malformed API key", headers=_UNAUTHORIZED)
    state = request.app.state
    digest = hash_key(token, state.settings.secret_key)
    cache: AuthCache = state.auth_cache
    principal = cache.get(digest)
    if principal is not None:
        return principal
    generation = cache.generation
    principal = await run_in_threadpool(_lookup_key, state.engine, prefix, digest)
    if principal is None:
        raise Problem(401, "invalid or revoked API key", headers=_UNAUTHORIZED)
    cache.put(digest, principal, generation)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
