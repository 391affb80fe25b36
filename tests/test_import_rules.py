"""Imports run one way. Walks every module's imports with ``ast`` (no code is run):

- ``app`` never imports torch, ``cnc_core`` or ``worker`` (its image has no torch);
- ``cnc_core`` never imports ``app``, ``worker``, web, queue or DB libraries, nor reads
  ``os.environ`` / ``os.getenv``;
- ``worker`` may import ``cnc_core`` and the shared ``app.core``, ``app.db``, ``app.queue``
  modules, never the HTTP layer (``app.api``, ``app.main``) or FastAPI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def env_reads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "getenv", "putenv")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            lines.append(node.lineno)
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in ("environ", "getenv") for a in node.names)
        ):
            lines.append(node.lineno)
    return lines


def _is(module: str, banned: str) -> bool:
    return module == banned or module.startswith(banned + ".")


def violations(package: str, banned: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(path):
            if any(_is(module, b) for b in banned):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


def test_app_never_imports_torch_or_the_library() -> None:
    banned = (
        "torch",
        "torchvision",
        "tensorly",
        "safetensors",
        "onnx",
        "onnxruntime",
        "cnc_core",
        "worker",
    )
    assert violations("app", banned) == []


def test_cnc_core_stays_pure() -> None:
    banned = (
        "app",
        "worker",
        "fastapi",
        "starlette",
        "celery",
        "kombu",
        "redis",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "httpx",
        "uvicorn",
        "pydantic_settings",
    )
    assert violations("cnc_core", banned) == []
    reads = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in sorted((ROOT / "cnc_core").rglob("*.py"))
        for line in env_reads(p)
    ]
    assert reads == []


def test_worker_uses_only_the_shared_parts_of_app() -> None:
    banned = (
        "app.api",
        "app.main",
        "app.metrics",
        "app.embedded",
        "fastapi",
        "starlette",
        "uvicorn",
    )
    assert violations("worker", banned) == []


@pytest.mark.parametrize("package", ["app", "worker"])
def test_rules_see_real_imports(package: str) -> None:
    # Guard against a walker that finds nothing (e.g. a wrong root): both import plenty.
    found = [m for p in (ROOT / package).rglob("*.py") for _, m in imports(p)]
    assert any(_is(m, "sqlalchemy") for m in found)


def test_api_method_list_matches_the_library() -> None:
    from app.methods import METHODS as API_METHODS
    from cnc_core.job import METHODS

    assert tuple(API_METHODS) == tuple(METHODS)


def test_api_advanced_settings_match_the_library() -> None:
    from app.methods import ADVANCED_KNOBS
    from cnc_core.job import advanced_knob_names

    assert advanced_knob_names() == ADVANCED_KNOBS


def test_api_setting_choices_match_the_library() -> None:
    from app.methods import ADVANCED_KNOBS, KNOB_CHOICES
    from cnc_core.job import advanced_knob_choices

    assert advanced_knob_choices() == KNOB_CHOICES
    assert set(KNOB_CHOICES) <= ADVANCED_KNOBS


def test_api_nullable_choices_match_the_library_fields() -> None:
    """A choice the API lets be null is one whose library field takes None, and back."""
    from dataclasses import fields

    from app.methods import KNOB_CHOICES, NULLABLE_CHOICES
    from cnc_core.purify import pipeline

    assert NULLABLE_CHOICES == pipeline.NULLABLE_CHOICES
    sections = pipeline._optional_defaults()
    for name, path in pipeline.KNOBS.items():
        if name not in KNOB_CHOICES:
            continue
        owner = pipeline.PurifyConfig()
        for key in path[:-1]:
            owner = getattr(owner, key) or sections[key]
        annotation = {f.name: str(f.type) for f in fields(owner)}[path[-1]]
        assert ("None" in annotation) == (name in NULLABLE_CHOICES), (name, annotation)


def test_api_setting_limits_match_the_library() -> None:
    from app.methods import ADVANCED_KNOBS, KNOB_CHOICES, KNOB_LIMITS
    from cnc_core.limits import KNOB_LIMITS as LIBRARY_LIMITS

    assert {k: tuple(v) for k, v in LIBRARY_LIMITS.items()} == {
        k: tuple(v) for k, v in KNOB_LIMITS.items()
    }
    # every setting is bounded one way: a string choice or a type and range, never neither
    assert set(KNOB_LIMITS) | set(KNOB_CHOICES) == ADVANCED_KNOBS
    assert not set(KNOB_LIMITS) & set(KNOB_CHOICES)


def test_api_and_library_accept_the_same_setting_values() -> None:
    """The API's pydantic check and ``cnc_core.limits.check_knob`` agree at every bound."""
    from pydantic import ValidationError

    from app.methods import KNOB_LIMITS
    from app.schemas import JobOptions
    from cnc_core.limits import check_knob

    def probes(limit: tuple) -> list[object]:
        kind, low, high = limit[0], limit[1], limit[2]
        values: list[object] = [None, True, False, 0, 1, 1.0, 2.5, -1, "1", [], [1], ["x"]]
        for bound in (low, high):
            if bound is not None:
                values += [bound, bound - 1, bound + 1, bound - 1e-9, bound + 1e-9]
                values += [[int(bound)], [int(bound) + 1]] if kind == "ints" else []
        return values

    disagree = []
    for name, limit in KNOB_LIMITS.items():
        for value in probes(limit):
            try:
                check_knob(name, value)
                library = True
            except ValueError:
                library = False
            try:
                JobOptions(arch="resnet18", num_classes=10, advanced={name: value})
                api = True
            except ValidationError:
                api = False
            if api != library:
                disagree.append((name, value, api, library))
    assert disagree == []


def test_job_spec_mirrors_job_config() -> None:
    from dataclasses import fields

    from app.schemas import JobOptions
    from cnc_core.job import JobConfig

    api = set(JobOptions.model_fields) - {"callback_url"}
    assert api == {f.name for f in fields(JobConfig)}
