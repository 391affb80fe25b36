"""Uploads: streaming into blobs, sha256, header checks, size limit, tenant isolation."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from app.db.blobs import iter_blob
from app.db.models import BlobChunk, Model
from app.main import create_app
from app.queue import JobQueue
from tests.service_support import bearer, make_settings, queued_tasks, safetensors_bytes


def test_upload_multipart_stores_chunks_and_digest(client, make_key, engine: Engine, queue):
    key = make_key()
    data = safetensors_bytes({"w": ([1000], b"\x00" * 4000), "b": ([10], b"\x01" * 40)})
    r = client.post("/v1/models", files={"file": ("m.safetensors", data)}, headers=bearer(key))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["size"] == len(data)
    assert body["format"] == "safetensors"
    assert body["status"] == "pending"
    assert r.headers["location"] == f"/v1/models/{body['id']}"
    with engine.connect() as conn:
        model = conn.execute(select(Model).where(Model.id == body["id"])).one()
        chunks = conn.execute(
            select(func.count()).select_from(BlobChunk).where(BlobChunk.blob_id == model.blob_id)
        ).scalar_one()
    assert chunks == 1
    assert b"".join(iter_blob(engine, model.blob_id)) == data
    tasks = queued_tasks(queue, queue.settings.light_queue)
    assert tasks and tasks[-1]["task"] == "cnc.validate_model" and tasks[-1]["args"] == [body["id"]]


def test_upload_raw_body_in_many_chunks(settings, engine: Engine, make_key):
    small = make_settings(settings.database_url, blob_chunk_bytes=1024)
    q = JobQueue(small)
    with TestClient(create_app(small, q)) as c:
        data = safetensors_bytes({"w": ([3000], bytes(range(256)) * 46 + b"\x00" * 224)})
        r = c.post(
            "/v1/models?filename=x.safetensors",
            content=data,
            headers={**bearer(make_key()), "Content-Type": "application/octet-stream"},
        )
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    with engine.connect() as conn:
        blob_id = conn.execute(select(Model.blob_id).where(Model.id == model_id)).scalar_one()
        n = conn.execute(
            select(func.count()).select_from(BlobChunk).where(BlobChunk.blob_id == blob_id)
        ).scalar_one()
    assert n == -(-len(data) // 1024)
    assert b"".join(iter_blob(engine, blob_id)) == data
    assert b"".join(iter_blob(engine, blob_id, 1000, 3000)) == data[1000:3000]


def test_upload_too_large_is_413(settings, engine: Engine, make_key):
    small = make_settings(settings.database_url, max_upload_bytes=2048, blob_chunk_bytes=512)
    with TestClient(create_app(small, JobQueue(small))) as c:
        key = make_key()
        data = safetensors_bytes({"w": ([1000], b"\x00" * 4000)})
        r = c.post("/v1/models", files={"file": ("m.safetensors", data)}, headers=bearer(key))
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/problem+json"
        assert "2048" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit applies while streaming
            for i in range(0, len(data), 256):
                yield data[i : i + 256]

        r = c.post(
            "/v1/models",
            content=chunks(),
            headers={**bearer(key), "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 413
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Model)).scalar_one() == 0


def _zip(names: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, payload in names.items():
            z.writestr(name, payload)
    return buf.getvalue()


def test_header_checks_reject_with_reason_and_fix(client, make_key):
    key = make_key()
    cases = {
        "legacy": pickle.dumps({"w": [1, 2]}, protocol=2),
        "TorchScript": _zip(
            {"m/data.pkl": b"x", "m/code/__torch__.py": b"", "m/constants.pkl": b""}
        ),
        "not a torch checkpoint": _zip({"readme.txt": b"hello"}),
        "unrecognised": b"hello world, not a model at all",
        "empty": b"",
    }
    for word, data in cases.items():
        r = client.post("/v1/models", files={"file": ("m.bin", data)}, headers=bearer(key))
        assert r.status_code == 422, (word, r.text)
        problem = r.json()
        assert problem["errors"][0]["field"] == "file"
        assert word.lower() in problem["detail"].lower(), problem
        assert "state_dict()" in problem["detail"] or "empty" in problem["detail"]


def test_torch_zip_layout_accepted(client, make_key):
    data = _zip(
        {
            "archive/data.pkl": b"\x80\x02}q\x00.",
            "archive/version": b"3\n",
            "archive/data/0": b"\x00" * 16,
        }
    )
    r = client.post("/v1/models", files={"file": ("m.pt", data)}, headers=bearer(make_key()))
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "torch-zip"


def test_truncated_safetensors_rejected(client, make_key):
    data = safetensors_bytes()[:-3]
    r = client.post(
        "/v1/models", files={"file": ("m.safetensors", data)}, headers=bearer(make_key())
    )
    assert r.status_code == 422
    assert "truncated" in r.json()["detail"]


def test_auth_required_and_tenant_isolation(client, make_key):
    r = client.post("/v1/models", files={"file": ("m", safetensors_bytes())})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/models", headers=bearer("cnc_nope_nope"))
    assert r.status_code == 401
    a, b = make_key("tenant-a"), make_key("tenant-b")
    r = client.post("/v1/models", files={"file": ("m", safetensors_bytes())}, headers=bearer(a))
    model_id = r.json()["id"]
    assert client.get(f"/v1/models/{model_id}", headers=bearer(a)).status_code == 200
    assert client.get(f"/v1/models/{model_id}", headers=bearer(b)).status_code == 404
    assert client.get("/v1/models", headers=bearer(b)).json() == []


def test_revoked_key_is_refused(client, make_key, engine):
    from app.cli import revoke_key
    from app.core.security import parse_prefix

    key = make_key()
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    prefix = parse_prefix(key)
    assert prefix is not None and revoke_key(engine, prefix)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 401
