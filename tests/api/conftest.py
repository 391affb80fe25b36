"""Service fixtures (see tests/service_support.py) plus an in-process API client."""
# ruff: noqa: F811 - fixtures imported from tests.service_support are requested by name

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.core.config import Settings
from app.main import create_app
from app.queue import JobQueue
from tests.service_support import (  # noqa: F401 - fixtures
    database_url,
    engine,
    make_key,
    queue,
    settings,
)


@pytest.fixture
def client(settings: Settings, engine: Engine, queue: JobQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings, queue)) as c:
        yield c
