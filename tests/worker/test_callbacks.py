"""Callback delivery: HMAC signature a receiver can verify, retries, the allowlist."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.security import SIGNATURE_HEADER, verify_signature
from app.db.models import Job, JobStatus, Tenant
from tests.service_support import make_settings, queued_tasks, safetensors_bytes
from tests.worker.helpers import add_job, add_model, get_job
from worker.callbacks import deliver


class Receiver:
    """A local HTTP endpoint answering with the given status codes in turn."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                self.send_response(outer.codes.pop(0) if outer.codes else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _ended_job(engine, settings, tmp_path: Path, url: str):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes())
    tenant, model = add_model(engine, settings, path)
    job_id = add_job(engine, tenant, model, callback_url=url)
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.SUCCEEDED,
                suspected_target=3,
                report={"detection": {"verify": {"verdict": "cleared", "class": 6}}},
            )
        )
    with Session(engine) as s:
        secret = s.get(Tenant, tenant).callback_secret
    return job_id, secret


def test_signed_delivery(engine, settings, queue, tmp_path):
    rx = Receiver([200])
    try:
        job_id, secret = _ended_job(engine, settings, tmp_path, rx.url)
        assert deliver(engine, settings, queue, job_id) == "delivered"
    finally:
        rx.close()
    headers, body = rx.requests[0]
    assert verify_signature(secret, body, headers[SIGNATURE_HEADER])
    assert not verify_signature("whsec_wrong", body, headers[SIGNATURE_HEADER])
    assert not verify_signature(secret, body + b" ", headers[SIGNATURE_HEADER])
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded"
    assert payload["job"]["id"] == str(job_id) and payload["job"]["suspected_target"] == 3
    residual = payload["job"]["residual_check"]
    assert residual["verdict"] == "cleared" and residual["suspect_class"] == 6
    job = get_job(engine, job_id)
    assert job.callback_status == "delivered" and job.callback_attempts == 1
    # Delivered once: a duplicate task does not post again.
    assert deliver(engine, settings, queue, job_id) == "delivered"
    assert len(rx.requests) == 1


def test_retries_with_backoff_then_gives_up(engine, settings, queue, tmp_path):
    rx = Receiver([500, 503, 500])
    few = make_settings(settings.database_url, callback_max_attempts=3)
    try:
        job_id, _ = _ended_job(engine, few, tmp_path, rx.url)
        assert deliver(engine, few, queue, job_id, attempt=1) == "pending"
        retry = queued_tasks(queue, few.light_queue)[-1]
        assert retry["task"] == "cnc.deliver_callback" and retry["args"] == [str(job_id), 2]
        assert deliver(engine, few, queue, job_id, attempt=2) == "pending"
        assert deliver(engine, few, queue, job_id, attempt=3) == "failed"
    finally:
        rx.close()
    job = get_job(engine, job_id)
    assert job.callback_status == "failed" and "HTTP 500" in (job.callback_error or "")
    assert len(rx.requests) == 3


def test_host_outside_allowlist_is_never_called(engine, settings, queue, tmp_path):
    rx = Receiver([200])
    closed = make_settings(settings.database_url, callback_allowed_hosts=["hooks.example.com"])
    try:
        job_id, _ = _ended_job(engine, closed, tmp_path, rx.url)
        assert deliver(engine, closed, queue, job_id) == "failed"
    finally:
        rx.close()
    assert rx.requests == []
    assert "ALLOWED_HOSTS" in (get_job(engine, job_id).callback_error or "")
