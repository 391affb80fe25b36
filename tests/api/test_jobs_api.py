"""Jobs: submit (JSON and multipart), 422s naming the field, idempotency, listing, cancel,
artifacts with ETag and Range, SSE, batches, health and metrics."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from app.db.blobs import BlobWriter
from app.db.models import Artifact, Job, JobStatus
from app.methods import METHODS
from tests.service_support import BASE_SPEC, bearer, queued_tasks, safetensors_bytes


def upload(client, key: str) -> str:
    r = client.post(
        "/v1/models", files={"file": ("m.safetensors", safetensors_bytes())}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def spec(model_id: str, **changes: Any) -> dict[str, Any]:
    return {**BASE_SPEC, "model_id": model_id, **changes}


def test_submit_json_is_202_and_enqueued_after_commit(client, make_key, queue, engine):
    key = make_key()
    model_id = upload(client, key)
    r = client.post("/v1/jobs", json=spec(model_id), headers=bearer(key))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert int(r.headers["retry-after"]) > 0
    assert job["status"] == "queued" and job["percent"] == 0 and job["attempt"] == 0
    assert job["spec"]["method"] == "compress"
    tasks = queued_tasks(queue)
    assert tasks == [{"task": "cnc.run_job", "args": [job["id"]], "id": tasks[0]["id"]}]
    with Session(engine) as s:
        assert s.get(Job, uuid.UUID(job["id"])).task_id == tasks[0]["id"]
    got = client.get(f"/v1/jobs/{job['id']}", headers=bearer(key))
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    assert "retry-after" in got.headers


def test_422_names_the_field(client, make_key):
    key = make_key()
    model_id = upload(client, key)
    cases = {
        "method": spec(model_id, method="magic"),
        "num_classes": spec(model_id, num_classes=1),
        "ratio": spec(model_id, ratio=0.5),
        "std": spec(model_id, std=[0.0]),
        "model_id": spec("not-a-uuid"),
        "colour": {**spec(model_id), "colour": "red"},
        "device": spec(model_id, device="tpu"),
        "advanced": spec(model_id, advanced={"epochs": 5, "epochz": 3}),
    }
    for field, body in cases.items():
        r = client.post("/v1/jobs", json=body, headers=bearer(key))
        assert r.status_code == 422, (field, r.text)
        problem = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert problem["errors"][0]["field"] == field, problem
        assert field in problem["detail"]
    r = client.post("/v1/jobs", json=spec(model_id, method="magic"), headers=bearer(key))
    assert all(m in r.json()["detail"] for m in METHODS)
    r = client.post("/v1/jobs", json=spec(model_id, advanced={"epochz": 3}), headers=bearer(key))
    assert "epochz" in r.json()["detail"] and "epochs" in r.json()["detail"]  # names the known
    bad_value = spec(model_id, advanced={"allocation_spectra": "gradient"})
    r = client.post("/v1/jobs", json=bad_value, headers=bearer(key))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "advanced"
    assert "gradient" in r.json()["detail"] and "response" in r.json()["detail"]
    for knob, value, reason in [
        ("num_images", 10**9, "less than or equal to 32768"),  # a runaway size
        ("lr", -0.1, "greater than or equal to 0"),
        ("epochs", "15", "valid integer"),  # no coercion: the worker would get a string
        ("cleaning", 1, "valid boolean"),
    ]:
        body = spec(model_id, advanced={knob: value})
        r = client.post("/v1/jobs", json=body, headers=bearer(key))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "advanced", r.text
        assert knob in r.json()["detail"] and reason in r.json()["detail"], r.text
    for knob in ("bn_mode", "warp_use"):  # a choice without a None field: null is refused
        r = client.post("/v1/jobs", json=spec(model_id, advanced={knob: None}), headers=bearer(key))
        assert (
            r.status_code == 422 and knob in r.json()["detail"] and "null" not in r.json()["detail"]
        )
    r = client.post(
        "/v1/jobs", json=spec(model_id, advanced={"warp_batch": "apart"}), headers=bearer(key)
    )
    assert r.status_code == 422 and "separate, joint, both, or null" in r.json()["detail"]
    good_value = spec(
        model_id,
        advanced={
            "allocation_spectra": "weight",
            "bn_mode": "eval",
            "lr": 1,
            "warp_weight": None,
            "permutation_blend_batch": None,  # undoes the preset's "joint"
        },
    )
    assert client.post("/v1/jobs", json=good_value, headers=bearer(key)).status_code == 202
    big = spec(model_id, method="cnc", input_size=512, advanced={"num_images": 2048})
    r = client.post("/v1/jobs", json=big, headers=bearer(key))
    assert r.status_code == 422 and "synthetic-image budget" in r.json()["detail"], r.text
    assert "2048 x 3 x 512^2" in r.json()["detail"]
    for method in ("compress", "clp"):  # no synthetic images: no budget
        body = spec(model_id, method=method, input_size=1024)
        r = client.post("/v1/jobs", json=body, headers=bearer(key))
        assert r.status_code == 202, r.text
    r = client.post("/v1/jobs", json=spec(model_id, mean=[0.1, 0.2]), headers=bearer(key))
    assert r.status_code == 422 and "mean" in r.json()["detail"]
    r = client.post("/v1/jobs", json=spec(str(uuid.uuid4())), headers=bearer(key))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "model_id"
    r = client.post(
        "/v1/jobs", content=b"{nope", headers={**bearer(key), "Content-Type": "application/json"}
    )
    assert r.status_code == 422


def test_idempotency_key(client, make_key, queue):
    key = make_key()
    model_id = upload(client, key)
    headers = {**bearer(key), "Idempotency-Key": "run-42"}
    first = client.post("/v1/jobs", json=spec(model_id), headers=headers)
    again = client.post("/v1/jobs", json=spec(model_id), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(queued_tasks(queue)) == 1
    other = client.post("/v1/jobs", json=spec(model_id, ratio=2.0), headers=headers)
    assert other.status_code == 409
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    # Keys are per tenant: another tenant's same key is a new job.
    key_b = make_key("other")
    model_b = upload(client, key_b)
    r = client.post(
        "/v1/jobs", json=spec(model_b), headers={**bearer(key_b), "Idempotency-Key": "run-42"}
    )
    assert r.status_code == 202 and r.json()["id"] != first.json()["id"]


def test_multipart_one_shot(client, make_key, queue):
    import json

    key = make_key()
    options = {k: v for k, v in BASE_SPEC.items()}
    r = client.post(
        "/v1/jobs",
        files={"file": ("m.safetensors", safetensors_bytes())},
        data={"spec": json.dumps(options)},
        headers=bearer(key),
    )
    assert r.status_code == 202, r.text
    job = r.json()
    model = client.get(f"/v1/models/{job['model_id']}", headers=bearer(key)).json()
    assert model["format"] == "safetensors"
    names = [t["task"] for t in queued_tasks(queue, queue.settings.light_queue)]
    assert "cnc.validate_model" in names
    bad = client.post(
        "/v1/jobs",
        files={"file": ("m", safetensors_bytes())},
        data={"spec": json.dumps({**options, "ratio": "x"})},
        headers=bearer(key),
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "spec.ratio"


def test_list_filters_and_cursor(client, make_key, engine: Engine):
    key = make_key()
    model_id = upload(client, key)
    ids = [
        client.post("/v1/jobs", json=spec(model_id, seed=i), headers=bearer(key)).json()["id"]
        for i in range(5)
    ]
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[0]).values(status=JobStatus.FAILED))
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params, headers=bearer(key)).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    failed = client.get("/v1/jobs", params={"status": "failed"}, headers=bearer(key)).json()
    assert [j["id"] for j in failed["items"]] == [ids[0]]
    future = client.get(
        "/v1/jobs", params={"created_after": "2100-01-01T00:00:00Z"}, headers=bearer(key)
    ).json()
    assert future["items"] == []
    assert client.get("/v1/jobs", params={"status": "nope"}, headers=bearer(key)).status_code == 422
    other = make_key("other")
    assert client.get("/v1/jobs", headers=bearer(other)).json()["items"] == []
    assert client.get(f"/v1/jobs/{ids[1]}", headers=bearer(other)).status_code == 404


def test_cancel_queued_job(client, make_key, engine):
    key = make_key()
    model_id = upload(client, key)
    job = client.post("/v1/jobs", json=spec(model_id), headers=bearer(key)).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(key))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert r.json()["cancel_requested"] is True
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(key))
    assert again.status_code == 409
    other = make_key("other")
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(other)).status_code == 404


def add_artifact(engine: Engine, job_id: str, name: str, data: bytes, ctype: str) -> None:
    with Session(engine) as s, s.begin():
        w = BlobWriter(s, 7)
        w.write(data)
        info = w.finish()
        s.add(
            Artifact(
                job_id=uuid.UUID(job_id),
                name=name,
                blob_id=info.id,
                content_type=ctype,
                size=info.size,
                sha256=info.sha256,
            )
        )
        s.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status=JobStatus.SUCCEEDED, percent=100.0, stage="done")
        )


def test_artifacts_etag_range_and_isolation(client, make_key, engine):
    key = make_key()
    model_id = upload(client, key)
    job_id = client.post("/v1/jobs", json=spec(model_id), headers=bearer(key)).json()["id"]
    data = bytes(range(100))
    add_artifact(engine, job_id, "plots/spectra.png", data, "image/png")
    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=bearer(key)).json()
    assert listing[0]["name"] == "plots/spectra.png"
    assert listing[0]["sha256"] == hashlib.sha256(data).hexdigest()
    url = f"/v1/jobs/{job_id}/artifacts/plots/spectra.png"
    full = client.get(url, headers=bearer(key))
    assert full.status_code == 200 and full.content == data
    assert full.headers["content-type"] == "image/png"
    assert full.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert full.headers["content-disposition"].startswith("inline")
    part = client.get(url, headers={**bearer(key), "Range": "bytes=10-29"})
    assert part.status_code == 206 and part.content == data[10:30]
    assert part.headers["content-range"] == "bytes 10-29/100"
    tail = client.get(url, headers={**bearer(key), "Range": "bytes=-5"})
    assert tail.content == data[-5:]
    assert client.get(url, headers={**bearer(key), "Range": "bytes=200-"}).status_code == 416
    cached = client.get(url, headers={**bearer(key), "If-None-Match": full.headers["etag"]})
    assert cached.status_code == 304
    assert client.get(url, headers=bearer(make_key("other"))).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/artifacts/nope", headers=bearer(key)).status_code == 404
    job = client.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json()
    assert job["artifacts"][0]["url"] == url


def test_events_stream_ends_on_terminal_state(client, make_key, engine):
    key = make_key()
    model_id = upload(client, key)
    job_id = client.post("/v1/jobs", json=spec(model_id), headers=bearer(key)).json()["id"]
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.FAILED, error="boom", error_code="x")
        )
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert "event: progress" in text and "event: end" in text and '"failed"' in text
    other = client.get(f"/v1/jobs/{job_id}/events", headers=bearer(make_key("other")))
    assert other.status_code == 404


def test_batches_json_and_multipart(client, make_key, queue):
    import json

    key = make_key()
    models = [upload(client, key) for _ in range(3)]
    r = client.post("/v1/batches", json={"jobs": [spec(m) for m in models]}, headers=bearer(key))
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["total"] == 3 and batch["status"] == "queued"
    assert batch["counts"]["queued"] == 3
    got = client.get(f"/v1/batches/{batch['id']}", headers=bearer(key)).json()
    assert {j["model_id"] for j in got["jobs"]} == set(models)
    assert len([t for t in queued_tasks(queue) if t["task"] == "cnc.run_job"]) == 3
    listed = client.get("/v1/jobs", params={"batch_id": batch["id"]}, headers=bearer(key)).json()
    assert len(listed["items"]) == 3
    bad = client.post(
        "/v1/batches",
        json={"jobs": [spec(models[0]), spec(models[1], ratio=0)]},
        headers=bearer(key),
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "jobs.1.ratio"
    options = {k: v for k, v in BASE_SPEC.items()}
    r = client.post(
        "/v1/batches",
        files=[
            ("files", ("a.safetensors", safetensors_bytes())),
            ("files", ("b.safetensors", safetensors_bytes())),
        ],
        data={"spec": json.dumps(options)},
        headers=bearer(key),
    )
    assert r.status_code == 202, r.text
    assert r.json()["total"] == 2
    assert (
        client.get(f"/v1/batches/{batch['id']}", headers=bearer(make_key("other"))).status_code
        == 404
    )


def test_callback_allowlist(client, make_key):
    key = make_key()
    model_id = upload(client, key)
    r = client.post(
        "/v1/jobs",
        json=spec(model_id, callback_url="https://evil.example.org/x"),
        headers=bearer(key),
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "callback_url"
    r = client.post(
        "/v1/jobs",
        json=spec(model_id, callback_url="ftp://hooks.example.com/x"),
        headers=bearer(key),
    )
    assert r.status_code == 422
    r = client.post(
        "/v1/jobs",
        json=spec(model_id, callback_url="https://hooks.example.com/x"),
        headers=bearer(key),
    )
    assert r.status_code == 202
    assert r.json()["callback"]["status"] == "pending"
    me = client.get("/v1/me", headers=bearer(key)).json()
    assert me["tenant"] == "acme" and me["callback_secret"].startswith("whsec_")


def test_health_ready_metrics_openapi(client, make_key):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    key = make_key()
    upload(client, key)
    text = client.get("/metrics").text
    assert 'cnc_http_requests_total{method="POST",route="/v1/models",status="201"} 1.0' in text
    assert 'cnc_jobs{status="queued"}' in text
    assert "cnc_queue_depth" in text
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs/{job_id}/events" in schema["paths"]


def test_readyz_reports_a_dead_broker(settings, engine):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.service_support import make_settings

    dead = make_settings(settings.database_url, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(dead)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["broker"].startswith("error")


def test_width_defaults_to_the_architecture_standard(client, make_key):
    key = make_key()
    model_id = upload(client, key)
    body = spec(model_id)
    body.pop("width", None)
    r = client.post("/v1/jobs", json=body, headers=bearer(key))
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["width"] is None  # the worker builds the registry default


def test_job_view_shows_the_residual_check_of_the_report(client, make_key, engine):
    key = make_key()
    model_id = upload(client, key)
    job_id = client.post("/v1/jobs", json=spec(model_id), headers=bearer(key)).json()["id"]
    url = f"/v1/jobs/{job_id}"
    assert client.get(url, headers=bearer(key)).json()["residual_check"] is None
    verify = {
        "verdict": "residual",
        "class": 4,
        "relative_growth_of_class": 1.1,
        "min_relative_growth": 1.5,
    }
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(
                status=JobStatus.SUCCEEDED,
                report={"detection": {"verify": {**verify, "acted_on": 0, "mask_norms": [1.0]}}},
            )
        )
    got = client.get(url, headers=bearer(key)).json()["residual_check"]
    assert got == {
        "verdict": "residual",
        "suspect_class": 4,
        "relative_growth": 1.1,
        "min_relative_growth": 1.5,
        "acted_on": 0,
    }
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    verdicts = schema["ResidualCheckOut"]["properties"]["verdict"]["enum"]
    assert verdicts == ["residual", "cleared", "unchecked"]


def test_the_api_knows_every_verdict_of_the_residual_check():
    """``app.schemas.ResidualCheckOut`` copies the verdicts (the API never imports torch)."""
    from typing import get_args

    from app.schemas import ResidualCheckOut
    from cnc_core.purify.verify import VERDICTS

    assert get_args(ResidualCheckOut.model_fields["verdict"].annotation) == VERDICTS
