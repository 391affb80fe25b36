"""Streaming request bodies into the blob store: raw bodies and multipart forms.

Starlette's form parser spools whole files before the handler runs; here each piece of
the file goes to the blob store as it arrives, so the size limit (413) applies while
streaming and memory stays at one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.core.problems import Problem
from app.db.blobs import BlobInfo, BlobTooLarge, BlobWriter

MAX_FIELD_BYTES = 1024 * 1024
# Bytes gathered on the event loop before one hand-over to the database thread: big enough
# that thread hops are rare, small enough that memory stays low.
PIECE_BYTES = 4 << 20


@dataclass
class StoredFile:
    field: str
    filename: str
    blob: BlobInfo
    head: bytes
    tail: bytes


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[StoredFile] = field(default_factory=list)


def check_length(request: Request, limit: int) -> None:
    """Refuse early when the client announces a body above the limit."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Problem(
            413, f"upload of {length} bytes exceeds the limit of {limit} bytes", field="file"
        )


class _Sink:
    """Feeds one upload to a :class:`BlobWriter`, overlapping the network and the database.

    Bytes are gathered on the event loop; each full piece (about 4 MiB) goes to the
    database (hash and COPY) in the thread pool *while* the loop keeps receiving the next
    one, so an upload takes max(network, database) rather than their sum. At most one
    piece is in flight and one is being gathered: about 8 MiB of memory per upload.
    """

    def __init__(self, session: Session, chunk: int, limit: int) -> None:
        self.writer = BlobWriter(session, chunk, max_bytes=limit)
        self.piece = max(PIECE_BYTES // chunk, 1) * chunk
        self.limit = limit
        self.size = 0
        self.pending = bytearray()
        self._inflight: asyncio.Future[None] | None = None

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:  # refuse at once, not when the chunk is written
            raise BlobTooLarge(self.limit)
        self.pending += data
        if len(self.pending) >= self.piece:
            piece, self.pending = self.pending, bytearray()  # hand over, no copy
            await self._wait()
            self._inflight = asyncio.ensure_future(run_in_threadpool(self.writer.write, piece))

    async def _wait(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            await inflight

    async def finish(self) -> BlobInfo:
        await self._wait()
        piece, self.pending = self.pending, bytearray()
        return await run_in_threadpool(self._finish, piece)

    def _finish(self, piece: bytearray) -> BlobInfo:
        self.writer.write(piece)
        return self.writer.finish()

    async def abort(self) -> None:
        """Stop after an error: let the piece in flight land, then end the COPY. Shielded,
        so a cancelled request (client gone) still hands back a usable connection."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self._wait()
            await run_in_threadpool(self.writer.abort)


async def store_raw_body(
    request: Request, session: Session, filename: str, chunk: int, limit: int
) -> StoredFile:
    """Store a raw (``application/octet-stream``) body as one file."""
    check_length(request, limit)
    sink = _Sink(session, chunk, limit)
    try:
        async for data in request.stream():
            await sink.write(data)
        blob = await sink.finish()
    except BaseException as exc:
        await sink.abort()
        if isinstance(exc, BlobTooLarge):
            raise Problem(
                413, f"upload exceeds the limit of {exc.limit} bytes", field="file"
            ) from None
        if isinstance(exc, ClientDisconnect):
            raise Problem(400, "the client disconnected during the upload") from None
        raise
    return StoredFile("file", filename, blob, sink.writer.head, sink.writer.tail)


async def _events(request: Request) -> AsyncIterator[tuple[str, object]]:
    """Parse a multipart body into events: ``("begin", (name, filename | None))``,
    ``("data", bytes)`` and ``("end", None)``."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(400, "multipart body without a boundary")
    events: list[tuple[str, object]] = []
    headers: dict[bytes, bytes] = {}
    name_buf = bytearray()
    value_buf = bytearray()

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name_buf.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value_buf.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(name_buf).lower()] = bytes(value_buf)
        name_buf.clear()
        value_buf.clear()

    def on_headers_finished() -> None:
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        events.append(("begin", (name, None if filename is None else filename.decode())))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        events.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        events.append(("end", None))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            for event in events:
                yield event
            events.clear()
        parser.finalize()
    except FormParserError:
        raise Problem(400, "malformed multipart body") from None
    except ClientDisconnect:
        raise Problem(400, "the client disconnected during the upload") from None
    for event in events:
        yield event


async def store_multipart(
    request: Request, session: Session, chunk: int, limit: int, max_files: int = 1
) -> Form:
    """Store every file part as a blob; keep the (small) text fields in memory."""
    check_length(request, limit * max_files + MAX_FIELD_BYTES)
    form = Form()
    sink: _Sink | None = None
    current: tuple[str, str | None] = ("", None)
    text = bytearray()
    try:
        async for kind, payload in _events(request):
            if kind == "begin":
                assert isinstance(payload, tuple)
                current = payload
                text.clear()
                if current[1] is not None:
                    if len(form.files) >= max_files:
                        raise Problem(
                            422, f"at most {max_files} file(s) per request", field=current[0]
                        )
                    sink = _Sink(session, chunk, limit)
            elif kind == "data":
                assert isinstance(payload, bytes)
                if sink is not None:
                    await sink.write(payload)
                else:
                    text += payload
                    if len(text) > MAX_FIELD_BYTES:
                        raise Problem(413, "form field too large", field=current[0])
            elif sink is not None:
                blob = await sink.finish()
                form.files.append(
                    StoredFile(
                        current[0], current[1] or "upload", blob, sink.writer.head, sink.writer.tail
                    )
                )
                sink = None
            else:
                form.fields[current[0]] = text.decode("utf-8", "replace")
    except BaseException as exc:
        if sink is not None:
            await sink.abort()
        if isinstance(exc, BlobTooLarge):
            raise Problem(
                413, f"upload exceeds the limit of {exc.limit} bytes", field="file"
            ) from None
        raise
    return form
