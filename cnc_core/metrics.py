"""Model size, compute and latency: the numbers a compression report is judged by.

Conventions
-----------
* ``input_shape`` is the shape of ONE sample, without the batch axis, e.g. ``(3, 32, 32)``.
* MACs (multiply-accumulates) are counted per sample on the leaf ``Conv*`` / ``Linear``
  layers only. BatchNorm, activations, pooling, additions and biases are not counted: they
  are a few percent of a CNN's compute and compression leaves them unchanged. Factorized
  layers built from ``nn.Conv2d`` / ``nn.Linear`` children (e.g. a Tucker-2 conv run as
  1x1 -> KxK -> 1x1) are therefore counted exactly; functional calls (``F.conv2d`` on a
  bare tensor) are not seen.
* Parameter ratios in the C&C paper (Phan et al., ECCV 2024) are whole-model parameter
  counts, original / compact, i.e. ratios of :func:`count_params`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "LatencyResult",
    "ModelStats",
    "count_macs",
    "count_params",
    "measure_latency",
    "model_bytes",
    "model_stats",
]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, in their actual dtypes (shared ones once)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _counted_layers(model: nn.Module) -> list[nn.Module]:
    """Conv/Linear modules with no Conv/Linear below them, so wrappers never count twice."""
    kinds = (_ConvNd, nn.Linear)
    return [
        m
        for m in model.modules()
        if isinstance(m, kinds) and not any(isinstance(c, kinds) for c in m.modules() if c is not m)
    ]


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, _ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        if module.transposed:
            # Each input element is scattered through (Cout / groups) * K^d weights.
            return inp.numel() * (module.out_channels // module.groups) * kernel
        # Each output element gathers (Cin / groups) * K^d products; the output shape
        # already accounts for stride, padding and dilation.
        return out.numel() * (module.in_channels // module.groups) * kernel
    assert isinstance(module, nn.Linear)
    return out.numel() * module.in_features


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; every submodule's own flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates for one sample of shape ``input_shape`` (no batch axis).

    Counted by forward hooks on the leaf ``Conv1d/2d/3d`` (grouped, strided, dilated and
    transposed) and ``nn.Linear`` modules, from the shapes they actually see; BN,
    activations, pooling and biases are not counted (see the module docstring). The model
    runs once in eval mode on its own device; its modes are restored and it is not changed.
    """
    total = 0

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        nonlocal total
        inp = args[0] if args else out
        total += _layer_macs(module, inp, out)

    handles = [m.register_forward_hook(hook) for m in _counted_layers(model)]
    try:
        x = torch.zeros((1, *input_shape), device=_model_device(model))
        with _eval_mode(model), torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass(frozen=True)
class LatencyResult:
    """Wall time of one forward pass of a batch, over ``repeats`` timed runs (ms)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    device: str
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default rule)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int,
    device: str | torch.device = "cpu",
    repeats: int = 20,
    warmup: int = 5,
    num_threads: int | None = None,
    seed: int = 0,
) -> LatencyResult:
    """Time the forward pass on a random batch of ``batch_size`` samples of ``input_shape``.

    Runs in eval mode under ``torch.inference_mode``; on CUDA each run is bracketed by
    ``torch.cuda.synchronize`` so the kernels' time is measured, not their launch. If the
    model is not on ``device`` a copy is moved there; the caller's model is never moved and
    its modes are restored. ``num_threads`` sets torch's intra-op threads for the duration.
    """
    if repeats < 1 or batch_size < 1 or warmup < 0:
        raise ValueError("repeats and batch_size must be >= 1 and warmup >= 0")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    runner = model if _model_device(model) == dev else copy.deepcopy(model).to(dev)
    cuda = dev.type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=generator).to(dev)

    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    times: list[float] = []
    try:
        with _eval_mode(runner), torch.inference_mode():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
                runner(x)
                if cuda:
                    torch.cuda.synchronize(dev)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        if num_threads is not None:
            torch.set_num_threads(old_threads)
    times.sort()
    return LatencyResult(
        median_ms=statistics.median(times),
        p10_ms=_quantile(times, 0.1),
        p90_ms=_quantile(times, 0.9),
        batch_size=batch_size,
        device=str(dev),
        repeats=repeats,
    )


@dataclass(frozen=True)
class ModelStats:
    """Size, compute and latency of one model for one input shape (one sample)."""

    params: int
    size_bytes: int
    macs: int
    input_shape: tuple[int, ...]
    latency: tuple[LatencyResult, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain ints, floats, strings and lists."""
        return {
            "params": self.params,
            "size_bytes": self.size_bytes,
            "macs": self.macs,
            "input_shape": list(self.input_shape),
            "latency": [r.to_dict() for r in self.latency],
        }


def model_stats(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    latency_batches: Sequence[int] = (1, 64),
    device: str | torch.device = "cpu",
    repeats: int = 20,
    warmup: int = 5,
    num_threads: int | None = None,
) -> ModelStats:
    """Gather :func:`count_params`, :func:`model_bytes`, :func:`count_macs` and one
    :func:`measure_latency` per batch size in ``latency_batches`` (none if empty).
    The model is not changed."""
    latency = tuple(
        measure_latency(
            model,
            input_shape,
            batch_size=b,
            device=device,
            repeats=repeats,
            warmup=warmup,
            num_threads=num_threads,
        )
        for b in latency_batches
    )
    return ModelStats(
        params=count_params(model),
        size_bytes=model_bytes(model),
        macs=count_macs(model, input_shape),
        input_shape=tuple(int(s) for s in input_shape),
        latency=latency,
    )
