"""Load test of the service, one command: ``.venv/bin/python bench/service_load.py``.

Starts the API (uvicorn) and two Celery workers on a fresh database of the machine's
PostgreSQL and on its Redis (or ``CNC_BENCH_PG_ADMIN`` / ``CNC_BENCH_REDIS_URL``), then:

1. uploads a ResNet-18-sized checkpoint (11.2M float32 parameters, 44.7 MB) from several
   concurrent clients, against a plain loopback TCP file copy measured in the same run;
2. polls job status from 200 concurrent clients, each once per ``Retry-After`` interval
   (1 s here), and records every request's latency;
3. queues 100 jobs (the tiny CNN, method ``compress``) and lets two workers drain them,
   counting lost jobs (not succeeded when the queue is empty) and double runs.

Targets (2-core machine): p99 poll latency < 50 ms, upload throughput >= 0.5x the loopback
copy, zero lost jobs. Results go to ``bench/results/service_load.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("CNC_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("CNC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RESNET18_PARAMS = 11_173_962
SPEC = {"arch": "simple_cnn", "num_classes": 10, "width": 8, "method": "compress",
        "ratio": 1.5, "device": "cpu", "export_onnx": False,
        "advanced": {"measure_latency": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def big_safetensors(path: Path, params: int) -> None:
    """A safetensors file of ``params`` random float32 values in ResNet-18-like tensors."""
    sizes, left = [], params
    while left > 0:
        n = min(left, 2_359_296)  # the 512x512x3x3 convs dominate ResNet-18
        sizes.append(n)
        left -= n
    header, offset = {}, 0
    for i, n in enumerate(sizes):
        header[f"layer{i}.weight"] = {"dtype": "F32", "shape": [n],
                                      "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in sizes:
            f.write(os.urandom(4 * n))


def loopback_copy(path: Path) -> float:
    """MB/s of sending the file over a loopback TCP socket into another file."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def receive() -> None:
        conn, _ = server.accept()
        with conn, tempfile.TemporaryFile() as out:
            while data := conn.recv(1 << 20):
                out.write(data)

    t = threading.Thread(target=receive)
    t.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, path.open("rb") as f:
        s.sendfile(f)
    t.join()
    server.close()
    return path.stat().st_size / (time.perf_counter() - start) / 1e6


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class Services:
    def __init__(self, workers: int) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.db = f"cnc_bench_{self.run}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="cnc-bench-"))
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.env = {**os.environ, "CNC_ENVIRONMENT": "test", "CNC_SECRET_KEY": "bench-" + self.run,
                    "CNC_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + self.db,
                    "CNC_BROKER_URL": REDIS, "CNC_QUEUE_PREFIX": f"cnc-bench-{self.run}",
                    "CNC_BLOB_CHUNK_BYTES": str(4 << 20), "OMP_NUM_THREADS": "1",
                    "CNC_PROGRESS_MIN_INTERVAL_S": "1"}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CNC_")})
        from app.db.migrate import upgrade

        upgrade(self.env["CNC_DATABASE_URL"])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._spawn("api", [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port),
                            "--log-level", "warning", "--no-access-log"])
        queues = f"cnc-bench-{self.run}.jobs,cnc-bench-{self.run}.light"
        for i in range(workers):
            self._spawn(f"w{i}", [sys.executable, "-m", "celery", "-A", "worker.celery_app",
                                  "worker", "--pool=solo", "-Q", queues, "-n",
                                  f"bench{i}-{self.run}@%h", "--loglevel=WARNING",
                                  "--without-gossip", "--without-mingle"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        from app.cli import create_key
        from app.core.config import Settings
        from app.db.session import get_engine

        settings = Settings()
        self.key = create_key(get_engine(settings.database_url, 1, 1), settings, "bench").token

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT))

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


def bench_uploads(svc: Services, path: Path, count: int, concurrency: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {svc.key}", "Content-Type": "application/octet-stream"}

    def one(_: int) -> float:
        start = time.perf_counter()
        with path.open("rb") as f:
            r = httpx.post(f"{svc.url}/v1/models?filename=resnet18.safetensors",
                           content=iter(lambda: f.read(1 << 20), b""), headers=headers,
                           timeout=300)
        r.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        times = list(pool.map(one, range(count)))
    wall = time.perf_counter() - start
    size = path.stat().st_size
    return {"files": count, "concurrency": concurrency, "file_mb": size / 1e6,
            "throughput_mb_s": count * size / wall / 1e6, "p50_s": statistics.median(times)}


async def bench_polling(svc: Services, job_id: str, clients: int, seconds: float,
                        interval: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=svc.url, limits=limits, timeout=10,
                                 headers={"Authorization": f"Bearer {svc.key}"}) as client:
        end = time.monotonic() + seconds

        async def poller(i: int) -> None:
            nonlocal errors
            await asyncio.sleep(interval * i / clients)  # spread the clients over a second
            while time.monotonic() < end:
                start = time.perf_counter()
                r = await client.get(f"/v1/jobs/{job_id}")
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))

        await asyncio.gather(*(poller(i) for i in range(clients)))
    return {"clients": clients, "seconds": seconds, "requests": len(latencies),
            "errors": errors, "rps": len(latencies) / seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


def bench_drain(svc: Services, model_path: Path, jobs: int, timeout: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {svc.key}"}
    with httpx.Client(base_url=svc.url, headers=headers, timeout=30) as c:
        model = c.post("/v1/models", files={"file": ("m.safetensors", model_path.read_bytes())})
        model.raise_for_status()
        start = time.perf_counter()
        ids = [c.post("/v1/jobs", json={**SPEC, "model_id": model.json()["id"], "seed": i})
               .json()["id"] for i in range(jobs)]
        deadline = time.monotonic() + timeout
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            page = c.get("/v1/jobs", params={"limit": 200}).json()["items"]
            statuses = {j["id"]: j["status"] for j in page}
            if all(statuses.get(i) in ("succeeded", "failed", "cancelled") for i in ids):
                break
            time.sleep(1)
        wall = time.perf_counter() - start
        page = c.get("/v1/jobs", params={"limit": 200}).json()["items"]
    attempts = [j["attempt"] for j in page if j["id"] in set(ids)]
    succeeded = sum(1 for i in ids if statuses.get(i) == "succeeded")
    return {"jobs": jobs, "workers": 2, "wall_s": wall, "jobs_per_min": 60 * succeeded / wall,
            "succeeded": succeeded, "lost": jobs - succeeded,
            "ran_more_than_once": sum(1 for a in attempts if a > 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--upload-concurrency", type=int, default=2)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--drain-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cnc-bench-data-"))
    big = work / "resnet18.safetensors"
    big_safetensors(big, RESNET18_PARAMS)
    tiny = work / "tiny.safetensors"
    import safetensors.torch
    import torch

    from cnc_core.models import create_model

    torch.manual_seed(0)
    safetensors.torch.save_file(create_model("simple_cnn", num_classes=10, width=8)
                                .state_dict(), str(tiny))
    svc = Services(workers=2)
    try:
        copy = loopback_copy(big)
        uploads = bench_uploads(svc, big, args.uploads, args.upload_concurrency)
        headers = {"Authorization": f"Bearer {svc.key}"}
        mid = httpx.post(f"{svc.url}/v1/models", headers=headers,
                         files={"file": ("m.safetensors", tiny.read_bytes())}).json()["id"]
        job = httpx.post(f"{svc.url}/v1/jobs", headers=headers,
                         json={**SPEC, "model_id": mid}).json()["id"]
        polling = asyncio.run(bench_polling(svc, job, args.clients, args.seconds, 1.0))
        drain = bench_drain(svc, tiny, args.jobs, args.drain_timeout)
    finally:
        svc.close()
    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "loopback_copy_mb_s": copy,
        "upload": uploads,
        "upload_vs_loopback": uploads["throughput_mb_s"] / copy,
        "polling": polling,
        "drain": drain,
        "targets": {
            "p99_poll_under_50ms": polling["p99_ms"] < 50,
            "upload_at_least_half_loopback": uploads["throughput_mb_s"] >= 0.5 * copy,
            "zero_lost_jobs": drain["lost"] == 0,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_load.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Service load test (bench/service_load.py)", "",
        f"Machine: {result['machine']}. One uvicorn process, two Celery workers (solo pool).", "",
        "| measure | value | target |", "|---|---|---|",
        f"| loopback TCP file copy | {copy:.0f} MB/s | |",
        f"| upload, {uploads['files']} x {uploads['file_mb']:.1f} MB, {uploads['concurrency']} "
        f"at a time | {uploads['throughput_mb_s']:.0f} MB/s "
        f"({result['upload_vs_loopback']:.2f}x copy) | >= 0.5x |",
        f"| polling, {polling['clients']} clients at 1/s | p50 {polling['p50_ms']:.1f} ms, "
        f"p99 {polling['p99_ms']:.1f} ms, {polling['rps']:.0f} req/s, "
        f"{polling['errors']} errors | p99 < 50 ms |",
        f"| drain, {drain['jobs']} jobs, 2 workers | {drain['wall_s']:.0f} s "
        f"({drain['jobs_per_min']:.0f} jobs/min), lost {drain['lost']}, "
        f"re-run {drain['ran_more_than_once']} | 0 lost |",
    ]
    (args.out / "service_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
