"""Shared helpers for the benchmarks: machine description and interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def machine() -> dict[str, Any]:
    """What ran the benchmark, for the results files."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def reference_gflops(size: int = 512, repeats: int = 20) -> float:
    """The machine's speed right now: fp32 GFLOP/s of a ``size`` x ``size`` matrix product
    (median of ``repeats``) with the current torch threads. Measured before and after a timed
    run, it shows whether the machine was slower (or shared) that day: one 2-core EPYC gave
    the same purification in 554 s one day and 214 s another."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times[2:]) / 1e9


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@torch.inference_mode()
def interleaved_latency(
    models: Sequence[nn.Module],
    input_shape: Sequence[int],
    *,
    batch_size: int,
    device: torch.device,
    repeats: int,
    warmup: int = 3,
    channels_last: bool = False,
) -> list[float]:
    """Median forward time (ms) of each model, timed round-robin so that machine noise
    falls on all of them alike: the ratios are measured side by side. ``channels_last``
    runs every model (weights and input) in NHWC memory format, as a deployment would."""
    x = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for model in models:
        model.eval().to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for _ in range(warmup):
            model(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def interleaved_onnx_latency(
    paths: Sequence[str],
    input_shape: Sequence[int],
    *,
    batch_size: int,
    repeats: int,
    threads: int = 2,
    warmup: int = 3,
) -> list[float]:
    """Median ONNX Runtime (CPU) run time (ms) of each exported model, round-robin: how the
    models run where most users deploy them."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]
