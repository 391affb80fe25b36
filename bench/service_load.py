"""Load test of the service, one command: ``.venv/bin/python bench/service_load.py``.

Starts the API (uvicorn) on a fresh database of the machine's PostgreSQL and on its Redis
(or ``CNC_BENCH_PG_ADMIN`` / ``CNC_BENCH_REDIS_URL``), then, in three phases:

1. **Uploads**: a ResNet-18-sized checkpoint (11.2M float32 parameters, 44.7 MB) sent
   ``--uploads`` times, ``--upload-concurrency`` at a time, over real HTTP with ``curl
   --data-binary`` (the client the README documents; httpx when there is no curl), each
   upload's sha256 checked. Side by side, in the same run, a plain loopback TCP copy of the
   same file into a file (before, between and after the uploads; the median is the
   reference) and, for diagnosis, Postgres' own ingest rate of the file (a direct binary
   COPY into ``blob_chunks``, rolled back): no upload can beat the database.
2. **Polling**: ``--clients`` concurrent clients each poll one queued job once per
   ``Retry-After``-like interval (1 s) for ``--seconds``, each on its own keep-alive
   HTTP/1.1 connection; every request's latency is recorded. The load generator is a
   minimal asyncio HTTP/1.1 client: httpx's AsyncClient with 200 pooled connections
   spends more CPU per request than the server does, and on 2 cores it measured itself.
3. **Drain**: two Celery workers start only now (in a deployment they run on GPU
   machines; here they would take the CPU the first two phases measure). ``--jobs``
   jobs (the tiny CNN, method ``compress``) are queued and drained; lost jobs (not
   succeeded when the queue is empty) and jobs run more than once are counted. The
   pollers run again during the drain, reported apart: workers and API then share the
   same 2 cores.

Targets (2-core machine): p99 poll latency < 50 ms at 200 clients, upload throughput
>= 0.5x the loopback copy, zero lost jobs. Results go to
``bench/results/service_load.{json,md}`` with the machine, and the load average before
and after (other engineers' jobs may share the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
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
SPEC = {
    "arch": "simple_cnn",
    "num_classes": 10,
    "width": 8,
    "method": "compress",
    "ratio": 1.5,
    "device": "cpu",
    "export_onnx": False,
    "advanced": {"measure_latency": False},
}
TERMINAL = ("succeeded", "failed", "cancelled")


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
        header[f"layer{i}.weight"] = {
            "dtype": "F32",
            "shape": [n],
            "data_offsets": [offset, offset + 4 * n],
        }
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


def database_ingest(database_url: str, path: Path, chunk: int) -> float:
    """MB/s of a direct binary COPY of the file into ``blob_chunks`` (rolled back)."""
    data = path.read_bytes()
    blob = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        start = time.perf_counter()
        conn.execute(
            "INSERT INTO blobs (id, size, sha256, chunk_size) VALUES (%s, 0, '', %s)", (blob, chunk)
        )
        with conn.cursor().copy(
            "COPY blob_chunks (blob_id, seq, data) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["uuid", "int4", "bytea"])
            for seq, at in enumerate(range(0, len(data), chunk)):
                copy.write_row((blob, seq, data[at : at + chunk]))
        conn.execute("SELECT 1")  # the COPY has landed
        elapsed = time.perf_counter() - start
        conn.rollback()
    return len(data) / elapsed / 1e6


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    with psycopg.connect(PG_ADMIN) as conn:
        pg = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": pg,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9),
    }


class Services:
    """The API now; the workers when :meth:`start_workers` is called. Own database."""

    def __init__(self, blob_chunk_bytes: int, uvicorn_args: list[str] | None = None) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.db = f"cnc_bench_{self.run}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="cnc-bench-"))
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.database_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.db
        self.env = {
            **os.environ,
            "CNC_ENVIRONMENT": "test",
            "CNC_SECRET_KEY": "bench-" + self.run,
            "CNC_DATABASE_URL": self.database_url,
            "CNC_BROKER_URL": REDIS,
            "CNC_QUEUE_PREFIX": f"cnc-bench-{self.run}",
            "CNC_BLOB_CHUNK_BYTES": str(blob_chunk_bytes),
            "OMP_NUM_THREADS": "1",
            "CNC_PROGRESS_MIN_INTERVAL_S": "1",
        }
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CNC_")})
        from app.db.migrate import upgrade

        upgrade(self.database_url)
        port = free_port()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        # The production command line: uvicorn picks httptools and uvloop when installed.
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                *(uvicorn_args or []),
            ],
        )
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
        self.workers = 0

    def start_workers(self, count: int) -> None:
        queues = f"cnc-bench-{self.run}.jobs,cnc-bench-{self.run}.light"
        for i in range(count):
            self._spawn(
                f"w{i}",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.celery_app",
                    "worker",
                    "--pool=solo",
                    "-Q",
                    queues,
                    "-n",
                    f"bench{i}-{self.run}@%h",
                    "--loglevel=WARNING",
                    "--without-gossip",
                    "--without-mingle",
                ],
            )
        self.workers += count

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

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


def upload_once(svc: Services, path: Path) -> tuple[float, str]:
    """One upload over HTTP; returns (seconds, sha256 the server recorded)."""
    url = f"{svc.url}/v1/models"
    start = time.perf_counter()
    if shutil.which("curl"):
        # The README's upload command: a multipart form, streamed from the file.
        run = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail-with-body",
                "-H",
                f"Authorization: Bearer {svc.key}",
                "-F",
                f"file=@{path}",
                url,
            ],
            capture_output=True,
            timeout=600,
        )
        if run.returncode != 0:
            raise RuntimeError(f"upload failed: {run.stderr!r} {run.stdout[:500]!r}")
        body = json.loads(run.stdout)
    else:
        headers = {"Authorization": f"Bearer {svc.key}", "Content-Type": "application/octet-stream"}
        with path.open("rb") as f:
            r = httpx.post(
                url + "?filename=resnet18.safetensors",
                content=iter(lambda: f.read(1 << 20), b""),
                headers=headers,
                timeout=600,
            )
        r.raise_for_status()
        body = r.json()
    return time.perf_counter() - start, str(body["sha256"])


def bench_uploads(svc: Services, path: Path, count: int, concurrency: int) -> dict[str, Any]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    copies = [loopback_copy(path)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: upload_once(svc, path), range(count)))
    wall = time.perf_counter() - start
    copies.append(loopback_copy(path))
    single = [upload_once(svc, path)[0]]  # one alone, for the per-stream rate
    copies.append(loopback_copy(path))
    ingest = [
        database_ingest(svc.database_url, path, int(svc.env["CNC_BLOB_CHUNK_BYTES"]))
        for _ in range(2)
    ]
    size = path.stat().st_size
    copy = statistics.median(copies)
    throughput = count * size / wall / 1e6
    return {
        "files": count,
        "concurrency": concurrency,
        "file_mb": size / 1e6,
        "client": "curl" if shutil.which("curl") else "httpx",
        "throughput_mb_s": throughput,
        "p50_s": statistics.median(t for t, _ in results),
        "single_stream_mb_s": size / single[0] / 1e6,
        "sha256_ok": all(d == digest for _, d in results),
        "loopback_copy_mb_s": copy,
        "loopback_copies_mb_s": copies,
        "ratio_to_loopback": throughput / copy,
        "postgres_copy_ingest_mb_s": max(ingest),
    }


async def _poll(
    host: str, port: int, path: str, key: str, clients: int, seconds: float, interval: float
) -> tuple[list[float], int]:
    """Each client: its own keep-alive connection, one GET per ``interval``."""
    latencies: list[float] = []
    errors = 0
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        await asyncio.sleep(interval * i / clients)  # spread the clients over an interval
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                ok = head[9:12] == b"200" and body.startswith(b"{")
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                ok = False  # a refused, dropped or stalled request: an error, reconnect
                if conn is not None:
                    conn[1].close()
                conn = None
            latencies.append(time.perf_counter() - start)
            errors += not ok
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, errors


def bench_polling(svc: Services, job_id: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies, errors = asyncio.run(
        _poll("127.0.0.1", svc.port, f"/v1/jobs/{job_id}", svc.key, clients, seconds, 1.0)
    )
    ms = [1000 * x for x in latencies]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(ms),
        "errors": errors,
        "rps": len(ms) / seconds,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


def bench_drain(
    svc: Services, model_path: Path, jobs: int, timeout: float, clients: int, poll_seconds: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {svc.key}"}
    with httpx.Client(base_url=svc.url, headers=headers, timeout=30) as c:
        model = c.post("/v1/models", files={"file": ("m.safetensors", model_path.read_bytes())})
        model.raise_for_status()
        ids = [
            c.post("/v1/jobs", json={**SPEC, "model_id": model.json()["id"], "seed": i}).json()[
                "id"
            ]
            for i in range(jobs)
        ]
        start = time.perf_counter()
        svc.start_workers(2)
        # Pollers during the drain: the API shares the 2 cores with two busy workers.
        during: dict[str, Any] = {}
        poller = threading.Thread(
            target=lambda: during.update(bench_polling(svc, ids[-1], clients, poll_seconds))
        )
        poller.start()
        deadline = time.monotonic() + timeout
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                items = c.get("/v1/jobs", params={"limit": 200}).json()["items"]
            except httpx.HTTPError:
                continue  # an overloaded API: ask again
            statuses = {j["id"]: j["status"] for j in items}
            if all(statuses.get(i) in TERMINAL for i in ids):
                break
            time.sleep(1)
        wall = time.perf_counter() - start
        poller.join()
        c.timeout = httpx.Timeout(120)
        items = c.get("/v1/jobs", params={"limit": 200}).json()["items"]
    wanted = set(ids)
    attempts = [j["attempt"] for j in items if j["id"] in wanted]
    succeeded = sum(1 for j in items if j["id"] in wanted and j["status"] == "succeeded")
    return {
        "jobs": jobs,
        "workers": 2,
        "wall_s": wall,
        "jobs_per_min": 60 * succeeded / wall,
        "succeeded": succeeded,
        "lost": jobs - succeeded,
        "ran_more_than_once": sum(1 for a in attempts if a > 1),
        "timed_out": wall >= timeout,
        "polling_during_drain": during,
    }


def report(result: dict[str, Any]) -> str:
    up, poll, drain = result["upload"], result["polling"], result["drain"]
    during = drain["polling_during_drain"]
    m = result["machine"]
    lines = [
        "# Service load test (bench/service_load.py)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}, "
        f"PostgreSQL {m['postgres']}. One uvicorn process ({result['uvicorn']}), two Celery "
        "workers (solo pool), all on this machine.  ",
        f"Load average (1/5/15 min) before {result['load_before']}, after "
        f"{result['load_after']}: other engineers' CPU jobs shared the 2 cores.",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        f"| loopback TCP file copy (median of 3) | {up['loopback_copy_mb_s']:.0f} MB/s "
        f"({', '.join(f'{x:.0f}' for x in up['loopback_copies_mb_s'])}) | | |",
        f"| upload, {up['files']} x {up['file_mb']:.1f} MB, {up['concurrency']} at a time "
        f"({'curl -F' if up['client'] == 'curl' else 'httpx'}) | {up['throughput_mb_s']:.0f} MB/s "
        f"({up['ratio_to_loopback']:.2f}x copy), one alone {up['single_stream_mb_s']:.0f} MB/s, "
        f"sha256 {'ok' if up['sha256_ok'] else 'WRONG'} | >= 0.5x | "
        f"{'yes' if result['targets']['upload_at_least_half_loopback'] else 'no'} |",
        f"| Postgres ingest ceiling (direct COPY of the file) | "
        f"{up['postgres_copy_ingest_mb_s']:.0f} MB/s | | |",
        f"| polling, {poll['clients']} clients at 1/s for {poll['seconds']:.0f} s | "
        f"p50 {poll['p50_ms']:.1f} ms, p90 {poll['p90_ms']:.1f} ms, p99 {poll['p99_ms']:.1f} ms, "
        f"max {poll['max_ms']:.0f} ms, {poll['rps']:.0f} req/s, {poll['errors']} errors | "
        f"p99 < 50 ms | {'yes' if result['targets']['p99_poll_under_50ms'] else 'no'} |",
        f"| drain, {drain['jobs']} jobs, 2 workers | {drain['wall_s']:.0f} s "
        f"({drain['jobs_per_min']:.0f} jobs/min), lost {drain['lost']}, "
        f"run twice {drain['ran_more_than_once']} | 0 lost | "
        f"{'yes' if result['targets']['zero_lost_jobs'] else 'no'} |",
    ]
    if during:
        lines.append(
            f"| polling during the drain (API and 2 busy workers on 2 cores), "
            f"{during['clients']} clients | p50 {during['p50_ms']:.1f} ms, p99 "
            f"{during['p99_ms']:.1f} ms, {during['rps']:.0f} req/s, {during['errors']} errors "
            "| (information) | |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--upload-concurrency", type=int, default=2)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--drain-timeout", type=float, default=900)
    parser.add_argument("--drain-poll-seconds", type=float, default=20)
    parser.add_argument("--blob-chunk-bytes", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--name", default="service_load", help="results file stem")
    parser.add_argument(
        "--uvicorn-args", default="", help="extra uvicorn options, e.g. '--http h11 --loop asyncio'"
    )
    args = parser.parse_args()

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="cnc-bench-data-"))
    big = work / "resnet18.safetensors"
    big_safetensors(big, RESNET18_PARAMS)
    tiny = work / "tiny.safetensors"
    import safetensors.torch
    import torch

    from cnc_core.models import create_model

    torch.manual_seed(0)
    safetensors.torch.save_file(
        create_model("simple_cnn", num_classes=10, width=8).state_dict(), str(tiny)
    )
    svc = Services(args.blob_chunk_bytes, shlex.split(args.uvicorn_args))
    try:
        uploads = bench_uploads(svc, big, args.uploads, args.upload_concurrency)
        headers = {"Authorization": f"Bearer {svc.key}"}
        mid = httpx.post(
            f"{svc.url}/v1/models",
            headers=headers,
            files={"file": ("m.safetensors", tiny.read_bytes())},
        ).json()["id"]
        job = httpx.post(
            f"{svc.url}/v1/jobs", headers=headers, json={**SPEC, "model_id": mid}
        ).json()["id"]
        polling = bench_polling(svc, job, args.clients, args.seconds)
        drain = bench_drain(
            svc, tiny, args.jobs, args.drain_timeout, args.clients, args.drain_poll_seconds
        )
    finally:
        svc.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": " ".join(["python bench/service_load.py", shlex.join(sys.argv[1:])]).strip(),
        "uvicorn": args.uvicorn_args or "default options: httptools and uvloop when installed",
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "upload": uploads,
        "polling": polling,
        "drain": drain,
        "targets": {
            "p99_poll_under_50ms": polling["p99_ms"] < 50 and polling["errors"] == 0,
            "upload_at_least_half_loopback": uploads["ratio_to_loopback"] >= 0.5,
            "zero_lost_jobs": drain["lost"] == 0,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
