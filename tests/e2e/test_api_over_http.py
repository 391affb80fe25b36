"""Over real HTTP (uvicorn) with a real worker: idempotent resubmission, tenant isolation,
413, 422 naming the field, and a hostile pickle that never runs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.service_support import BASE_SPEC, bearer, make_settings

pytestmark = pytest.mark.slow


def test_rules_over_http(
    stack: Stack, make_key, tiny_model: Path, tmp_path: Path, settings
) -> None:
    import os

    import torch

    stack.settings = make_settings(settings.database_url, max_upload_bytes=200_000)
    url = stack.start_api()
    stack.start_worker("w1")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, str(evil))

    a = httpx.Client(base_url=url, headers=bearer(make_key("a")), timeout=30)
    b = httpx.Client(base_url=url, headers=bearer(make_key("b")), timeout=30)
    with a, b:
        # 413: a file above CNC_MAX_UPLOAD_BYTES.
        big = a.post("/v1/models", files={"file": ("big.safetensors", b"\0" * 300_000)})
        assert big.status_code == 413
        # Idempotent resubmission.
        model = a.post("/v1/models", files={"file": ("m.safetensors", tiny_model.read_bytes())})
        body = {**BASE_SPEC, "model_id": model.json()["id"]}
        first = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
        second = a.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        conflict = a.post(
            "/v1/jobs", json={**body, "ratio": 2.0}, headers={"Idempotency-Key": "k1"}
        )
        assert conflict.status_code == 409
        # 422 naming the field.
        bad = a.post("/v1/jobs", json={**body, "num_classes": 0})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "num_classes"
        # Tenant isolation: b sees none of a's things.
        job_id = first.json()["id"]
        assert b.get(f"/v1/jobs/{job_id}").status_code == 404
        assert b.get(f"/v1/models/{model.json()['id']}").status_code == 404
        assert b.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert b.get(f"/v1/jobs/{job_id}/artifacts/report.json").status_code == 404
        assert b.get("/v1/jobs").json()["items"] == []
        # A hostile pickle: accepted as a torch zip, refused by the worker, never run.
        up = a.post("/v1/models", files={"file": ("evil.pt", evil.read_bytes())})
        assert up.status_code == 201 and up.json()["format"] == "torch-zip"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = a.get(f"/v1/models/{up.json()['id']}").json()
            if state["status"] != "pending":
                break
            time.sleep(0.3)
        assert state["status"] == "invalid" and state["error"], state
        job = a.post("/v1/jobs", json={**body, "model_id": up.json()["id"]})
        assert job.status_code == 422 and job.json()["errors"][0]["field"] == "model_id"
        assert not marker.exists()
