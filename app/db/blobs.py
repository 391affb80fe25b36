"""Chunked blob store in Postgres: no shared filesystem between the API and the workers.

A blob is a row in ``blobs`` plus numbered ``blob_chunks`` of at most ``chunk_size``
bytes. Writes append one chunk at a time inside the caller's transaction (an aborted upload
leaves nothing behind); reads fetch one chunk per query, so a 500 MB file never sits whole
in memory on either side.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session

from app.db.models import Blob, BlobChunk

HEAD_BYTES = 1 << 20
TAIL_BYTES = 256 << 10


class BlobTooLarge(Exception):  # noqa: N818 - reads as the condition
    """The stream exceeded the size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class BlobInfo:
    id: uuid.UUID
    size: int
    sha256: str


class BlobWriter:
    """Append bytes to a new blob inside ``session``'s transaction.

    Parameters
    ----------
    session : the open session; the caller commits.
    chunk_size : bytes per stored chunk.
    max_bytes : raise :class:`BlobTooLarge` once more than this many bytes arrive.
    """

    def __init__(self, session: Session, chunk_size: int, max_bytes: int | None = None) -> None:
        self.session = session
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.id = uuid.uuid4()
        self.size = 0
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._seq = 0
        # The first and last bytes, kept for format checks (safetensors header, zip directory).
        self._head = bytearray()
        self._tail = bytearray()
        session.execute(insert(Blob).values(id=self.id, chunk_size=chunk_size))

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    @property
    def tail(self) -> bytes:
        return bytes(self._tail)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise BlobTooLarge(self.max_bytes)
        self._hash.update(data)
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        self._tail += data[-TAIL_BYTES:]
        if len(self._tail) > TAIL_BYTES:
            del self._tail[: len(self._tail) - TAIL_BYTES]
        self._buffer += data
        while len(self._buffer) >= self.chunk_size:
            self._flush(bytes(self._buffer[: self.chunk_size]))
            del self._buffer[: self.chunk_size]

    def _flush(self, chunk: bytes) -> None:
        self.session.execute(insert(BlobChunk).values(blob_id=self.id, seq=self._seq, data=chunk))
        self._seq += 1

    def finish(self) -> BlobInfo:
        if self._buffer:
            self._flush(bytes(self._buffer))
            self._buffer.clear()
        digest = self._hash.hexdigest()
        self.session.execute(
            update(Blob).where(Blob.id == self.id).values(size=self.size, sha256=digest)
        )
        return BlobInfo(self.id, self.size, digest)


def write_file(session: Session, path: Path, chunk_size: int) -> BlobInfo:
    """Store a local file as a blob (the worker's artifacts)."""
    writer = BlobWriter(session, chunk_size)
    with path.open("rb") as fh:
        while data := fh.read(chunk_size):
            writer.write(data)
    return writer.finish()


def iter_blob(
    engine: Engine, blob_id: uuid.UUID, start: int = 0, end: int | None = None
) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of a blob, one stored chunk per query."""
    with engine.connect() as conn:
        row = conn.execute(select(Blob.size, Blob.chunk_size).where(Blob.id == blob_id)).one()
    size, chunk_size = row
    end = size if end is None else min(end, size)
    if start >= end:
        return
    seq = start // chunk_size
    offset = start - seq * chunk_size
    remaining = end - start
    while remaining > 0:
        # A connection per chunk: a slow client never pins a pooled connection for long.
        with engine.connect() as conn:
            data = conn.execute(
                select(BlobChunk.data).where(BlobChunk.blob_id == blob_id, BlobChunk.seq == seq)
            ).scalar_one()
        piece = bytes(data[offset : offset + remaining])
        yield piece
        remaining -= len(piece)
        offset = 0
        seq += 1


def copy_to_file(engine: Engine, blob_id: uuid.UUID, path: Path) -> int:
    """Write a blob to a local file; returns its size."""
    size = 0
    with path.open("wb") as fh:
        for piece in iter_blob(engine, blob_id):
            fh.write(piece)
            size += len(piece)
    return size


def delete_blob(session: Session, blob_id: uuid.UUID) -> None:
    session.execute(delete(Blob).where(Blob.id == blob_id))
