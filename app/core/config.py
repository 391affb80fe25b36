"""One ``Settings`` object for the API, the workers, the CLI and the embedded launcher.

Every field reads from an environment variable with the ``CNC_`` prefix
(``CNC_DATABASE_URL``, ``CNC_BROKER_URL``, ...). The module imports no torch, so the API
image (which has none) and the workers share it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRET = "change-me"


class Settings(BaseSettings):
    """Service configuration. Defaults suit one machine in development."""

    model_config = SettingsConfigDict(env_prefix="CNC_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    # Pepper for API-key hashes. Outside development a real secret is required.
    secret_key: str = PLACEHOLDER_SECRET
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/cnc"
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Queue names; tests give each run its own prefix so runs never see each other's tasks.
    queue_prefix: str = "cnc"
    db_pool_size: int = 10
    db_max_overflow: int = 20
    # Ping each pooled connection before use. The API does not by default (a status poll
    # would pay a second round trip); a dropped connection then fails one request and
    # SQLAlchemy replaces the whole pool.
    db_pool_pre_ping: bool = False

    # Uploads and blobs.
    max_upload_bytes: int = 2 * 1024**3
    # Bytes per stored blob row: at most 8000, so a row fits a Postgres page uncompressed
    # (see app/db/blobs.py). Uploads still reach the database in 4 MiB pieces.
    blob_chunk_bytes: Annotated[int, Field(ge=1, le=8000)] = 8000
    max_batch_jobs: int = 100
    # API: a verified key is trusted this long before it is looked up again. Revocations
    # reach every API process at once by Postgres NOTIFY; the TTL bounds a missed one.
    auth_cache_ttl_s: float = 60.0
    sse_poll_s: float = 0.5  # how often /events reads the job row

    # Job execution. A lease is renewed by a heartbeat thread; when it lapses (the worker
    # died), a reaper in any live worker puts the job back on the queue.
    lease_ttl_s: float = 60.0
    heartbeat_s: float = 10.0
    reaper_interval_s: float = 15.0
    max_attempts: int = 3
    progress_min_interval_s: float = 1.0
    # Soft: checked at each progress report (the job fails with code time_limit). Hard: a
    # watchdog thread records time_limit and SIGKILLs the worker (worker/runner.py).
    job_soft_time_limit_s: float = 3 * 3600
    job_hard_time_limit_s: float = 3 * 3600 + 600
    # Must exceed the hard limit: Redis redelivers an unacknowledged task after it.
    visibility_timeout_s: int = 4 * 3600
    # Test-only: seconds the worker spends in a "prepare" stage before the library runs,
    # reporting progress, so that a test can cancel or kill a job mid-run.
    job_start_delay_s: float = 0.0
    # Test-only: spend that delay in one sleep with no progress reports (a hung call), so
    # only the hard time limit can stop it.
    job_start_delay_blocking: bool = False
    work_dir: str | None = None  # worker scratch space; default: the system temp dir

    # Callbacks: hosts a callback_url may name ("*.example.com" matches subdomains).
    callback_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    callback_max_attempts: int = 6
    callback_backoff_s: float = 2.0
    callback_timeout_s: float = 10.0

    @field_validator("callback_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.environment != "development" and self.secret_key == PLACEHOLDER_SECRET:
            raise ValueError(
                f"CNC_SECRET_KEY is the placeholder {PLACEHOLDER_SECRET!r}; set a real secret "
                f"outside development (environment={self.environment})"
            )
        if self.visibility_timeout_s <= self.job_hard_time_limit_s:
            raise ValueError("CNC_VISIBILITY_TIMEOUT_S must exceed CNC_JOB_HARD_TIME_LIMIT_S")
        if self.job_soft_time_limit_s >= self.job_hard_time_limit_s:
            raise ValueError("CNC_JOB_SOFT_TIME_LIMIT_S must be below CNC_JOB_HARD_TIME_LIMIT_S")
        if self.heartbeat_s >= self.lease_ttl_s:
            raise ValueError("CNC_HEARTBEAT_S must be below CNC_LEASE_TTL_S")
        return self

    @property
    def job_queue(self) -> str:
        return f"{self.queue_prefix}.jobs"

    @property
    def light_queue(self) -> str:
        """Validation and callback deliveries: short tasks."""
        return f"{self.queue_prefix}.light"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
