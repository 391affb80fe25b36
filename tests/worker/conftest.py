"""Service fixtures (see tests/service_support.py) for worker tests."""

from __future__ import annotations

from tests.service_support import (  # noqa: F401 - fixtures
    database_url,
    engine,
    make_key,
    queue,
    settings,
)
