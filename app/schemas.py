"""Request and response bodies of the v1 API (pydantic; no FastAPI, no torch)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from app.methods import (
    ADVANCED_KNOBS,
    DEFAULT_NUM_IMAGES,
    KNOB_CHOICES,
    KNOB_LIMITS,
    MAX_IMAGE_VALUES,
    METHODS,
    NULLABLE_CHOICES,
)


class JobOptions(BaseModel):
    """What to run on a checkpoint. Mirrors ``cnc_core.job.JobConfig`` field for field."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    arch: str = Field(min_length=1, max_length=64, description="Architecture registry name")
    num_classes: int = Field(ge=2, le=100_000)
    in_chans: int = Field(3, ge=1, le=64)
    input_size: int = Field(32, ge=8, le=1024, description="Square input side, pixels")
    width: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Channel width; null means the architecture's standard width (64 for ResNets)",
    )
    mean: list[float] = Field(default_factory=lambda: [0.0], min_length=1, max_length=64)
    std: list[float] = Field(default_factory=lambda: [1.0], min_length=1, max_length=64)
    method: str = Field("cnc", description=f"One of {', '.join(METHODS)}")
    ratio: float = Field(3.0, ge=1.0, le=64.0, description="Parameters, original / compact")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    export_onnx: bool = True
    advanced: dict[str, Any] = Field(
        default_factory=dict,
        description="Expert knobs by name; each is checked against its choices "
        "(KNOB_CHOICES) or its type and range (KNOB_LIMITS) at submission",
    )
    callback_url: str | None = Field(
        None, max_length=2048, description="POSTed (HMAC-signed) when the job ends"
    )

    @field_validator("method")
    @classmethod
    def _method_known(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
        return value

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError("every std value must be positive")
        return value

    @field_validator("advanced")
    @classmethod
    def _advanced_small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > 64 or len(json.dumps(value)) > 16_384:
            raise ValueError("too many advanced settings (64 keys, 16 KiB at most)")
        unknown = sorted(set(value) - ADVANCED_KNOBS)
        if unknown:
            raise ValueError(
                f"unknown advanced setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(ADVANCED_KNOBS))}"
            )
        for name, choices in KNOB_CHOICES.items():
            if name not in value or value[name] in choices:
                continue
            if value[name] is None and name in NULLABLE_CHOICES:
                continue
            also = ", or null" if name in NULLABLE_CHOICES else ""
            raise ValueError(
                f"advanced setting {name}={value[name]!r} is not one of {', '.join(choices)}{also}"
            )
        for name in sorted(set(value) & set(KNOB_LIMITS)):
            try:
                _knob_type(name).validate_python(value[name])
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"]
                raise ValueError(f"advanced setting {name}={value[name]!r}: {reason}") from None
        return value

    @field_validator("callback_url")
    @classmethod
    def _callback_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _channels_match(self) -> JobOptions:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.in_chans):
                raise ValueError(
                    f"{name} needs 1 or in_chans={self.in_chans} values, got {len(values)}"
                )
        return self

    @model_validator(mode="after")
    def _image_budget(self) -> JobOptions:
        """The synthetic image set's size across settings (``cnc_core.limits``'s rule)."""
        if self.method in ("compress", "clp"):  # no synthetic images
            return self
        n = self.advanced.get("num_images", DEFAULT_NUM_IMAGES)
        values = n * self.in_chans * self.input_size**2
        if values > MAX_IMAGE_VALUES:
            raise ValueError(
                f"num_images x in_chans x input_size^2 = {n} x {self.in_chans} x "
                f"{self.input_size}^2 = {values:,} values exceeds the synthetic-image budget "
                f"of {MAX_IMAGE_VALUES:,} (2 GiB of float32); lower num_images or input_size"
            )
        return self


@cache
def _knob_type(name: str) -> TypeAdapter[Any]:
    """A strict pydantic type for one bounded advanced setting (``KNOB_LIMITS``)."""
    kind, low, high, nullable, open_low, max_items = KNOB_LIMITS[name]
    bounds: dict[str, Any] = {"le": high, "strict": True}
    bounds["gt" if open_low else "ge"] = low
    scalar: Any = {
        "bool": Annotated[bool, Field(strict=True)],
        "int": Annotated[int, Field(**bounds)],
        "float": Annotated[float, Field(**bounds, allow_inf_nan=False)],
        "ints": list[Annotated[int, Field(**bounds)]],
        "strs": list[Annotated[str, Field(min_length=low, max_length=high, strict=True)]],
    }[kind]
    if kind == "ints":
        scalar = Annotated[scalar, Field(min_length=1, max_length=max_items)]
    elif kind == "strs":
        scalar = Annotated[scalar, Field(max_length=max_items)]
    return TypeAdapter(scalar | None if nullable else scalar)


class JobSpec(JobOptions):
    """A job on an uploaded model (``POST /v1/models`` returned ``model_id``)."""

    model_id: uuid.UUID


def request_hash(spec: JobSpec) -> str:
    """Digest of the normalised request, to tell an idempotent retry from a new body."""
    return digest_of(spec.model_dump(mode="json"))


def digest_of(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def upload_request_hash(options: JobOptions, files: list[tuple[str, str]]) -> str:
    """Digest of a multipart submission: the options and each file's (name, sha256).

    A retried upload stores the file again under a new model id, so the id cannot be part
    of what makes two submissions "the same body"; the file's content can."""
    return digest_of({"options": options.model_dump(mode="json"), "files": files})


class Links(BaseModel):
    self: str
    model_config = ConfigDict(extra="allow")


class ModelOut(BaseModel):
    id: uuid.UUID
    filename: str
    size: int
    sha256: str
    format: str
    status: str
    error: str | None = None
    summary: dict[str, Any] | None = None
    created_at: datetime
    validated_at: datetime | None = None
    links: dict[str, str]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    content_type: str
    url: str


class ErrorOut(BaseModel):
    code: str
    message: str


class CallbackOut(BaseModel):
    url: str
    status: str
    attempts: int
    error: str | None = None


class ResidualCheckOut(BaseModel):
    """Neural Cleanse re-run on the purified model (method ``cnc``; README, "Residual
    check"). ``verdict`` "residual": a class that was Neural Cleanse's outlier on the
    original still needs a small trigger (its mask grew less than ``min_relative_growth``
    times the median class's), the removal is unconfirmed; "cleared": every such class's
    mask grew past the bar; "unchecked": Neural Cleanse saw no outlier on the original
    (all-to-all, input-dependent and warp backdoors give none), nothing to confirm."""

    verdict: Literal["residual", "cleared", "unchecked"]
    suspect_class: int | None = None
    relative_growth: float | None = None
    min_relative_growth: float | None = None
    acted_on: int | None = None


class JobOut(BaseModel):
    id: uuid.UUID
    status: str
    stage: str
    percent: float
    eta_s: float | None = None
    attempt: int
    max_attempts: int
    device: str | None = None
    model_id: uuid.UUID
    batch_id: uuid.UUID | None = None
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    timings: dict[str, Any]
    suspected_target: int | None = None
    residual_check: ResidualCheckOut | None = None
    metrics: dict[str, Any] | None = None
    error: ErrorOut | None = None
    cancel_requested: bool
    callback: CallbackOut | None = None
    artifacts: list[ArtifactOut] = Field(default_factory=list)
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = None


class BatchRequest(BaseModel):
    """Many jobs in one request: a manifest of job specs on uploaded models."""

    model_config = ConfigDict(extra="forbid")
    jobs: list[JobSpec] = Field(min_length=1)


class BatchJobOut(BaseModel):
    id: uuid.UUID
    model_id: uuid.UUID
    status: str
    percent: float
    links: dict[str, str]


class BatchOut(BaseModel):
    id: uuid.UUID
    status: str
    created_at: datetime
    total: int
    counts: dict[str, int]
    jobs: list[BatchJobOut]
    links: dict[str, str]


class TenantOut(BaseModel):
    tenant: str
    callback_secret: str
