"""Shared request dependencies as ``Annotated`` aliases: settings, DB session, tenant."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Problem
from app.core.security import hash_key, parse_prefix
from app.db.models import ApiKey
from app.queue import JobQueue


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_queue(request: Request) -> JobQueue:
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


class AuthCache:
    """Recently verified keys, so a client polling every second costs no key lookup.

    A revoked key keeps working for at most ``ttl`` seconds (``CNC_AUTH_CACHE_TTL_S``)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            item = self._items.get(digest)
            if item is None or item[0] < time.monotonic():
                self._items.pop(digest, None)
                return None
            return item[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[digest] = (time.monotonic() + self.ttl, principal)


_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def current_principal(request: Request, settings: SettingsDep) -> Principal:
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
    digest = hash_key(token, settings.secret_key)
    cache: AuthCache = request.app.state.auth_cache
    principal = cache.get(digest)
    if principal is not None:
        return principal
    with Session(request.app.state.engine) as session:
        key = session.scalars(
            select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        ).one_or_none()
        if key is None or key.key_hash != digest:
            raise Problem(401, "invalid or revoked API key", headers=_UNAUTHORIZED)
        principal = Principal(tenant_id=key.tenant_id, key_id=key.id)
    cache.put(digest, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
