"""The curl examples of README.md's service section run as written against a live API and worker.

Every ```bash block of the document runs, in order, as one script (``set -euo pipefail``),
with the ``CNC_URL`` and ``CNC_KEY`` that ``make serve`` would print. ```shell blocks are
deployment commands (Docker, key CLI) and are not run here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Stack
from tests.service_support import bearer

pytestmark = pytest.mark.slow
DOC = ROOT / "README.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_doc_has_the_walkthrough() -> None:
    blocks = bash_blocks(DOC.read_text())
    joined = "\n".join(blocks)
    for needle in (
        "/v1/models",
        "/v1/jobs",
        "/events",
        "/artifacts/",
        "/v1/batches",
        "callback_url",
    ):
        assert needle in joined, needle


def test_curl_examples_run_as_written(stack: Stack, make_key, tmp_path: Path) -> None:
    import httpx

    url = stack.start_api()
    stack.start_worker("w1")
    key = make_key()
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(DOC.read_text()))
    env = {**os.environ, "CNC_URL": url, "CNC_KEY": key, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stdout + run.stderr + stack.log("w1")
    assert '"status": "succeeded"' in run.stdout, run.stdout
    assert '"field":"method"' in run.stdout
    for name in (
        "model.safetensors",
        "manifest.json",
        "model.onnx",
        "report.json",
        "plots/spectra.png",
    ):
        assert (tmp_path / "result" / name).stat().st_size > 0, name
    assert (tmp_path / "result/plots/spectra.png").read_bytes().startswith(b"\x89PNG")
    jobs = httpx.get(f"{url}/v1/jobs", headers=bearer(key)).json()["items"]
    assert len(jobs) >= 6  # walkthrough, one-shot, 2 + 1 batch jobs, callback job
