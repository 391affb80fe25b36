"""Batch idempotency keys, multipart retries, immediate key revocation, COPY-written blobs."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app.api.deps import AuthCache, Principal
from app.cli import create_key, revoke_key
from app.core.security import hash_key
from app.db.blobs import MAX_CHUNK_BYTES, BlobWriter, iter_blob
from app.db.models import ApiKey, Batch, Blob, BlobChunk, Job, Model
from app.main import create_app
from app.queue import JobQueue
from tests.service_support import BASE_SPEC, bearer, make_settings, queued_tasks, safetensors_bytes


def upload(client: TestClient, key: str) -> str:
    r = client.post(
        "/v1/models", files={"file": ("m.safetensors", safetensors_bytes())}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def spec(model_id: str, **changes: Any) -> dict[str, Any]:
    return {**BASE_SPEC, "model_id": model_id, **changes}


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_batch_idempotency_key_json(client, make_key, queue, engine):
    key = make_key()
    models = [upload(client, key) for _ in range(2)]
    body = {"jobs": [spec(m) for m in models]}
    headers = {**bearer(key), "Idempotency-Key": "nightly-7"}
    first = client.post("/v1/batches", json=body, headers=headers)
    again = client.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    assert count(engine, Batch) == 1 and count(engine, Job) == 2
    assert len([t for t in queued_tasks(queue) if t["task"] == "cnc.run_job"]) == 2
    # Same key, another body: 409 naming the header, and nothing created.
    other = client.post("/v1/batches", json={"jobs": [spec(models[0], ratio=2.0)]}, headers=headers)
    assert other.status_code == 409, other.text
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert count(engine, Batch) == 1 and count(engine, Job) == 2
    # Without a key, the same body is a new batch; keys are per tenant.
    assert (
        client.post("/v1/batches", json=body, headers=bearer(key)).json()["id"]
        != first.json()["id"]
    )
    key_b = make_key("other")
    r = client.post(
        "/v1/batches",
        json={"jobs": [spec(upload(client, key_b))]},
        headers={**bearer(key_b), "Idempotency-Key": "nightly-7"},
    )
    assert r.status_code == 202 and r.json()["id"] != first.json()["id"]
    long_key = client.post(
        "/v1/batches", json=body, headers={**bearer(key), "Idempotency-Key": "k" * 256}
    )
    assert long_key.status_code == 422


def test_batch_idempotency_key_multipart_stores_files_once(client, make_key, engine):
    key = make_key()
    options = json.dumps(dict(BASE_SPEC))
    files = [
        ("files", ("a.safetensors", safetensors_bytes())),
        ("files", ("b.safetensors", safetensors_bytes({"v": ([1], b"\0" * 4)}))),
    ]
    headers = {**bearer(key), "Idempotency-Key": "upload-1"}
    first = client.post("/v1/batches", files=files, data={"spec": options}, headers=headers)
    assert first.status_code == 202, first.text
    blobs = count(engine, Blob)
    again = client.post("/v1/batches", files=files, data={"spec": options}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert count(engine, Blob) == blobs and count(engine, Model) == 2  # rolled back
    # Other content under the same key is a conflict.
    changed = [files[0], ("files", ("b.safetensors", safetensors_bytes()))]
    r = client.post("/v1/batches", files=changed, data={"spec": options}, headers=headers)
    assert r.status_code == 409 and count(engine, Model) == 2


def test_multipart_job_retry_with_key_is_a_replay(client, make_key, engine, queue):
    key = make_key()
    form = {"spec": json.dumps(dict(BASE_SPEC))}
    headers = {**bearer(key), "Idempotency-Key": "one-shot"}
    file = {"file": ("m.safetensors", safetensors_bytes())}
    first = client.post("/v1/jobs", files=file, data=form, headers=headers)
    again = client.post("/v1/jobs", files=file, data=form, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert count(engine, Model) == 1 and count(engine, Job) == 1
    assert len(queued_tasks(queue)) == 1
    other = client.post(
        "/v1/jobs",
        files={"file": ("m.safetensors", safetensors_bytes({"w": ([1], b"\0" * 4)}))},
        data=form,
        headers=headers,
    )
    assert other.status_code == 409 and count(engine, Model) == 1


def test_revoked_key_is_refused_at_once_despite_the_cache(settings, engine: Engine):
    cached = make_settings(settings.database_url, auth_cache_ttl_s=300.0)
    created = create_key(engine, cached, "acme")
    with TestClient(create_app(cached, JobQueue(cached))) as c:
        cache: AuthCache = c.app.state.auth_cache  # type: ignore[attr-defined]
        assert c.get("/v1/models", headers=bearer(created.token)).status_code == 200
        assert cache.wait_listening(10), "the revocation listener did not connect"
        assert c.get("/v1/models", headers=bearer(created.token)).status_code == 200
        digest = hash_key(created.token, cached.secret_key)
        assert cache.get(digest) is not None  # served from the cache from now on
        # Revoked in another "process" (straight in the database, as the CLI does).
        assert revoke_key(engine, created.prefix)
        deadline = time.monotonic() + 3  # far below the 300 s TTL
        status = 200
        while time.monotonic() < deadline and status == 200:
            status = c.get("/v1/models", headers=bearer(created.token)).status_code
            time.sleep(0.02)
        assert status == 401
        # A deleted key is forgotten the same way.
        other = create_key(engine, cached, "acme")
        for _ in range(2):
            assert c.get("/v1/models", headers=bearer(other.token)).status_code == 200
        assert cache.get(hash_key(other.token, cached.secret_key)) is not None
        with Session(engine) as s, s.begin():
            s.delete(s.scalars(select(ApiKey).where(ApiKey.prefix == other.prefix)).one())
        deadline = time.monotonic() + 3
        while (
            time.monotonic() < deadline
            and cache.get(hash_key(other.token, cached.secret_key)) is not None
        ):
            time.sleep(0.02)
        assert cache.get(hash_key(other.token, cached.secret_key)) is None


def test_cache_is_not_trusted_while_the_listener_is_down():
    cache = AuthCache(60.0, database_url=None)  # nothing to listen to
    cache.put("d", Principal(uuid.uuid4(), uuid.uuid4(), "p"), cache.generation)
    assert cache.get("d") is None


def test_a_lookup_racing_a_revocation_is_not_cached(database_url):
    cache = AuthCache(60.0, database_url)
    cache.start()
    assert cache.wait_listening(10)
    try:
        before = cache.generation
        cache.forget_prefix("p")  # a notice arrives while the lookup is in flight
        cache.put("d", Principal(uuid.uuid4(), uuid.uuid4(), "p"), before)
        assert cache.get("d") is None
        cache.put("d", Principal(uuid.uuid4(), uuid.uuid4(), "p"), cache.generation)
        assert cache.get("d") is not None
    finally:
        cache.stop()


def test_blob_in_page_sized_rows_roundtrip_and_abort(engine: Engine):
    data = os.urandom(3 * 4096 * 1024 + 12345)  # several COPY pieces and read batches
    with Session(engine) as s, s.begin():
        w = BlobWriter(s, MAX_CHUNK_BYTES)
        for at in range(0, len(data), 65536):
            w.write(data[at : at + 65536])
        info = w.finish()
    assert info.size == len(data)
    with engine.connect() as conn:
        rows = conn.execute(
            select(func.count()).select_from(BlobChunk).where(BlobChunk.blob_id == info.id)
        ).scalar_one()
    assert rows == -(-len(data) // MAX_CHUNK_BYTES)
    assert b"".join(iter_blob(engine, info.id)) == data
    start, end = 4096 * 1024 - 10, 2 * 4096 * 1024 + 7777
    assert b"".join(iter_blob(engine, info.id, start, end)) == data[start:end]
    # An aborted writer leaves the session usable and nothing stored.
    before = count(engine, BlobChunk)
    with Session(engine) as s:
        w = BlobWriter(s, MAX_CHUNK_BYTES)
        w.write(data[:100_000])
        w.abort()
        s.rollback()
        assert s.execute(select(func.count()).select_from(Blob)).scalar_one() >= 1
    assert count(engine, BlobChunk) == before
