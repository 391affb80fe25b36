"""Migrations (upgrade from empty, downgrade, upgrade again) and the deployment files."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path

import psycopg
import pytest

from app.db.base import Base
from app.db.migrate import downgrade, upgrade
from tests.service_support import create_database, drop_database, require_services

ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows} - {"alembic_version"}


def test_migrations_upgrade_downgrade_roundtrip() -> None:
    require_services()
    name = f"cnc_migr_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        upgrade(url)
        assert _tables(url) == set(Base.metadata.tables)
        downgrade(url, "base")
        assert _tables(url) == set()
        upgrade(url)
        assert _tables(url) == set(Base.metadata.tables)
    finally:
        drop_database(name)


def _revision_0002_state(url: str) -> tuple[bool, str, bool]:
    """(notify trigger present, blob_chunks.data storage, batches.idempotency_key present)."""
    with psycopg.connect(url) as conn:
        trigger = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'api_keys_notify'"
        ).fetchone()
        storage = conn.execute(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'blob_chunks'::regclass "
            "AND attname = 'data'"
        ).fetchone()
        column = conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'batches' "
            "AND column_name = 'idempotency_key'"
        ).fetchone()
    assert trigger and storage and column
    return bool(trigger[0]), str(storage[0]), bool(column[0])


def test_migration_0002_upgrade_and_downgrade() -> None:
    require_services()
    name = f"cnc_migr_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        upgrade(url, "0001")
        assert _revision_0002_state(url) == (False, "e", False)  # e: external (TOAST)
        upgrade(url)
        assert _revision_0002_state(url) == (True, "p", True)  # p: plain
        downgrade(url, "0001")
        assert _revision_0002_state(url) == (False, "e", False)
    finally:
        drop_database(name)


def test_migrations_match_the_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[\[=<>]", line, maxsplit=1)[0].lower()
            out[name] = line
    return out


def test_image_requirements_match_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["service"])
    for image in ("api", "worker"):
        reqs = _pins((ROOT / f"docker/requirements-{image}.txt").read_text().splitlines())
        assert "torch" not in reqs  # the API has none; the worker installs the CUDA build
        for name, line in reqs.items():
            assert declared.get(name) == line, f"{image}: {line} vs {declared.get(name)}"
    api = _pins((ROOT / "docker/requirements-api.txt").read_text().splitlines())
    assert {"fastapi", "uvicorn", "sqlalchemy", "celery"} <= set(api)


def test_compose_file_declares_the_services() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    services = set(re.findall(r"^  ([a-z]+):$", text, flags=re.M))
    assert {"postgres", "redis", "migrate", "api", "worker"} <= services
    assert "service_completed_successfully" in text and "capabilities: [gpu]" in text
    assert text.count("healthcheck:") >= 3


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="no docker compose client on this machine")
def test_compose_config_parses() -> None:
    env = {"CNC_SECRET_KEY": "x", "POSTGRES_PASSWORD": "y", "PATH": "/usr/bin:/usr/local/bin"}
    run = subprocess.run(
        ["docker", "compose", "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
