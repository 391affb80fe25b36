"""One whole job, file in and artifacts out: what the CLI and the worker both run.

This is the seam between the library and the service. The worker hands a checkpoint
path, an output folder and a :class:`JobConfig` (built from the JSON job spec), and gets
a :class:`JobResult` naming the files written. Everything here is plain data, so the
service can store it as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnc_core import __version__
from cnc_core.allocation import ALLOCATORS
from cnc_core.compress import (
    COMPRESS_KNOBS,
    MAC_ALLOCATIONS,
    CompressConfig,
    compress,
    split_compress_knobs,
)
from cnc_core.export import ModelSpec, json_default, save_compact
from cnc_core.io import load_checkpoint
from cnc_core.limits import DEFAULT_NUM_IMAGES, check_image_budget, check_knobs
from cnc_core.metrics import measure_latency, model_stats
from cnc_core.onnx_export import export_onnx, verify_onnx
from cnc_core.plots import plot_histogram, plot_spectra, plot_summary
from cnc_core.progress import ProgressFn, StagePlan
from cnc_core.report_md import write_report_md
from cnc_core.scaling import SCALING_RULES

METHODS = ("cnc", "cnc-paper", "clp", "compress")


@dataclass(frozen=True)
class JobConfig:
    """What to do with an uploaded checkpoint.

    The model contract: ``arch`` is a registry name (see ``cnc_core.models``), built with
    ``num_classes``, ``in_chans`` and ``width``; it expects inputs of shape
    ``(N, in_chans, input_size, input_size)`` normalised by ``mean``/``std`` (one value or
    one per channel, in [0, 1] pixel units). The compact model keeps the same contract.
    """

    arch: str
    num_classes: int
    in_chans: int = 3
    input_size: int = 32
    width: int | None = None  # channel width; None = the architecture's default
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    method: str = "cnc"  # one of METHODS
    ratio: float = 3.0  # whole-model parameter ratio, original / compact
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    export_onnx: bool = True
    # Advanced knobs forwarded to the compression / purification configs by name
    # (e.g. {"scaling": "clip", "t_scale": 0.5, "allocation": "keep_ratio",
    #  "num_images": 1024, "epochs": 10}). Unknown names are an error.
    advanced: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        data = dict(data)
        for key in ("mean", "std"):
            if key in data and not isinstance(data[key], tuple):
                value = data[key]
                data[key] = tuple(value) if isinstance(value, list | tuple) else (float(value),)
        return cls(**data)


@dataclass(frozen=True)
class JobResult:
    """What a job produced. ``artifacts`` maps artifact names to files under ``out_dir``:
    ``model.safetensors``, ``manifest.json``, ``model.onnx`` (when exported),
    ``report.json``, and ``plots/*.png``."""

    out_dir: Path
    artifacts: dict[str, Path]
    report: dict[str, Any]
    device: str
    suspected_target: int | None = None


# --------------------------------------------------------------------------------------------
# Running a job
# --------------------------------------------------------------------------------------------

# Advanced knobs that run_job itself reads (the rest go to CompressConfig / PurifyConfig).
JOB_KNOBS = {"latency_repeats": 10, "latency_batches": (1, 64), "measure_latency": True}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def split_advanced(config: JobConfig) -> tuple[CompressConfig, dict[str, Any], dict[str, Any]]:
    """Split ``config.advanced`` into a CompressConfig, purification knobs and job knobs."""
    check_knobs(config.advanced)
    knobs = dict(config.advanced)
    job_knobs = {k: knobs.pop(k, v) for k, v in JOB_KNOBS.items()}
    compress_kwargs, knobs = split_compress_knobs(knobs)
    if config.method != "compress":  # the method's own defaults, under the caller's settings
        defaults = _purify_fn().METHOD_COMPRESS_DEFAULTS.get(config.method, {})
        compress_kwargs = {**defaults, **compress_kwargs}
    cc = CompressConfig(ratio=config.ratio, **compress_kwargs)
    return cc, knobs, job_knobs


def advanced_knob_names() -> frozenset[str]:
    """Every name ``advanced`` accepts: job, compression and purification knobs."""
    return frozenset(JOB_KNOBS) | COMPRESS_KNOBS | frozenset(_purify_fn().KNOBS)


def advanced_knob_choices() -> dict[str, tuple[str, ...]]:
    """The string-valued ``advanced`` settings and the values each accepts."""
    return {
        "allocation": tuple(ALLOCATORS.names()),
        "mac_allocation": MAC_ALLOCATIONS,
        "scaling": tuple(SCALING_RULES.names()),
        **_purify_fn().KNOB_CHOICES,
    }


def _purify_fn() -> Any:
    """The purification entry point (imported lazily: it pulls in more of the library)."""
    from cnc_core.purify import pipeline

    return pipeline


def run_job(
    checkpoint: Path,
    out_dir: Path,
    config: JobConfig,
    progress: ProgressFn | None = None,
) -> JobResult:
    """Load ``checkpoint``, purify/compress it per ``config``, write every artifact.

    Stages (progress names): ``load``, ``compress`` or ``purify`` (with nested
    sub-stages), ``export``, ``measure``, ``plots``. Raises ``CheckpointError`` /
    ``ValueError`` for bad input and ``Cancelled`` when the listener cancels.
    """
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main_stage = "compress" if config.method == "compress" else "purify"
    plan = StagePlan(
        [("load", 0.5), (main_stage, 10.0), ("export", 1.0), ("measure", 2.0), ("plots", 0.5)],
        progress,
    )
    device = resolve_device(config.device)
    compress_config, purify_knobs, job_knobs = split_advanced(config)
    if config.method == "compress" and purify_knobs:
        raise ValueError(f"unknown advanced settings for method compress: {sorted(purify_knobs)}")
    compress_config.validate()
    if config.method not in ("compress", "clp"):  # no synthetic images
        num_images = purify_knobs.get("num_images", DEFAULT_NUM_IMAGES)
        check_image_budget(num_images, config.in_chans, config.input_size)
    spec = ModelSpec(
        arch=config.arch,
        num_classes=config.num_classes,
        in_chans=config.in_chans,
        width=config.width,
        input_size=config.input_size,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )
    input_shape = spec.input_shape

    with plan.stage("load"):
        torch.manual_seed(config.seed)
        original = spec.build()
        load_checkpoint(checkpoint, original)
        original.to(device).eval()

    detection: dict[str, Any] = {}
    suspected: int | None = None
    purify_timings: dict[str, float] = {}
    with plan.stage(main_stage):
        if config.method == "compress":
            result = compress(
                original,
                compress_config,
                progress=plan.nested(main_stage),
                input_shape=input_shape,
            )
            compact, decisions, summary = result.model, result.decisions, result.summary()
            surgery = result.surgery_record()
        else:
            pipeline = _purify_fn()
            purified = pipeline.purify(
                original,
                pipeline.PurifyConfig.from_knobs(
                    method=config.method,
                    compress=compress_config,
                    seed=config.seed,
                    knobs=purify_knobs,
                ),
                mean=spec.mean,
                std=spec.std,
                input_shape=input_shape,
                device=device,
                progress=plan.nested(main_stage),
            )
            compact = purified.model
            cres = purified.compress
            decisions = cres.decisions if cres is not None else []
            summary = cres.summary() if cres is not None else {}
            surgery = cres.surgery_record() if cres is not None else []
            detection = purified.detection
            suspected = purified.suspected_target
            purify_timings = dict(purified.timings)
    compact.eval()

    artifacts: dict[str, Path] = {}
    with plan.stage("export") as report:
        weights, manifest = save_compact(
            compact, out_dir, spec, surgery, extra={"method": config.method}
        )
        artifacts["model.safetensors"], artifacts["manifest.json"] = weights, manifest
        report(0.3)
        onnx_check: dict[str, Any] | None = None
        if config.export_onnx:
            onnx_path = export_onnx(compact, out_dir / "model.onnx", input_shape)
            check = verify_onnx(compact, onnx_path, input_shape)
            if not check.passed:
                raise RuntimeError(f"ONNX export does not match PyTorch: {check}")
            onnx_check = _plain(check)
            artifacts["model.onnx"] = onnx_path

    with plan.stage("measure") as report:
        metrics = _measure(original, compact, input_shape, device, job_knobs, report)
    with plan.stage("plots"):
        plots = out_dir / "plots"
        artifacts["plots/spectra.png"] = plot_spectra(decisions, plots / "spectra.png")
        headline = {
            "method": config.method,
            "arch": f"{config.arch} (width {config.width or 'default'})",
            "params": f"{metrics['before']['params']:,} -> {metrics['after']['params']:,}",
            **{k: v for k, v in metrics["ratios"].items()},
            "device": describe_device(device),
        }
        if suspected is not None:
            headline["suspected target"] = suspected
        artifacts["plots/summary.png"] = plot_summary(decisions, headline, plots / "summary.png")
        for name, counts in detection.get("histograms", {}).items():
            path = plot_histogram(counts, plots / f"{name}.png", title=name.replace("_", " "))
            artifacts[f"plots/{name}.png"] = path

    report_data = {
        "cnc_version": __version__,
        "torch_version": torch.__version__,
        "job": config.to_dict(),
        "device": describe_device(device),
        "compression": summary,
        "metrics": metrics,
        "onnx": onnx_check,
        "suspected_target": suspected,
        "detection": detection,
        "timings_s": dict(plan.timings),
        "purify_timings_s": purify_timings,
        "layers": [d.to_dict() for d in decisions],
    }
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report_data, indent=2, default=json_default))
    artifacts["report.json"] = report_path
    artifacts["report.md"] = write_report_md(out_dir, report_data)
    return JobResult(
        out_dir=out_dir,
        artifacts=artifacts,
        report=report_data,
        device=describe_device(device),
        suspected_target=suspected,
    )


def _measure(
    original: torch.nn.Module,
    compact: torch.nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    knobs: dict[str, Any],
    report: Any,
) -> dict[str, Any]:
    """Params, MACs, bytes and latency of both models: on the CPU always (the deployment
    target of most users), and on the job's GPU as well when it ran on one."""
    batches = tuple(knobs["latency_batches"]) if knobs["measure_latency"] else ()
    repeats = int(knobs["latency_repeats"])
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    out: dict[str, Any] = {}
    for i, (key, model) in enumerate((("before", original), ("after", compact))):
        stats = model_stats(model, input_shape, latency_batches=(), device=device).to_dict()
        for dev in devices:
            for batch in batches:
                result = measure_latency(
                    model, input_shape, batch_size=batch, device=dev, repeats=repeats
                )
                stats["latency"].append(result.to_dict())
        out[key] = stats
        report((i + 1) / 2)
    out["ratios"] = _ratios(out["before"], out["after"])
    return out


def _ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    ratios = {
        "param ratio": before["params"] / max(after["params"], 1),
        "MAC ratio": before["macs"] / max(after["macs"], 1),
    }
    after_latency = {(r["batch_size"], r["device"]): r for r in after.get("latency", [])}
    for old in before.get("latency", []):
        new = after_latency.get((old["batch_size"], old["device"]))
        if new:
            key = f"speed-up batch {old['batch_size']} ({old['device']})"
            ratios[key] = old["median_ms"] / max(new["median_ms"], 1e-9)
    return ratios


def _plain(obj: Any) -> Any:
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
