"""Engines and sessions. Each process builds one engine per database URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (compose and users write those)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """The URL as libpq (``psycopg.connect``) reads it, without SQLAlchemy's driver tag."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=8)
def get_engine(
    url: str, pool_size: int = 10, max_overflow: int = 20, pre_ping: bool = True
) -> Engine:
    """A pooled engine.

    ``pre_ping`` tests each connection with a round trip when it leaves the pool; the API
    turns it off (a poll would pay that round trip twice) and relies on SQLAlchemy
    invalidating the whole pool on the first disconnect error instead.
    """
    return create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=pre_ping,
        # Connections idle in the pool longer than this are replaced, so a server-side
        # idle timeout or a restarted database rarely reaches a request.
        pool_recycle=1800,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session
