"""ONNX export of a classifier, and a check of the export against PyTorch with ONNX Runtime.

The exported graph has one input ``"input"`` of shape ``(batch, *input_shape)`` and one
output ``"logits"`` of shape ``(batch, num_classes)``, with a dynamic batch axis, in a
single self-contained ``.onnx`` file (weights inside, no external data).

With torch 2.13 two exporters exist: the TorchScript-based one (``dynamo=False``; deprecated
but fast, about 0.1 s for a small CNN, and exact for plain CNNs) and the ``torch.export``
based one (``dynamo=True``, via onnxscript; seconds, opset >= 18). ``exporter="auto"`` tries
the TorchScript one first and falls back to the dynamo one, so the code keeps working once
the TorchScript exporter is removed.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxCheck",
    "OnnxExportError",
    "export_onnx",
    "verify_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
Exporter = Literal["auto", "torchscript", "dynamo"]
# The dynamo exporter implements opset 18 and up; asking for less triggers a version
# conversion that fails on Reduce* ops (measured with onnxscript 0.7.2, onnx 1.23).
_DYNAMO_MIN_OPSET = 18


class OnnxExportError(RuntimeError):
    """No exporter could produce an ONNX file for the model."""


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's output against PyTorch's, on one seeded random batch.

    ``passed`` requires ``onnx.checker`` to accept the file, equal output shapes, finite
    outputs and ``allclose(ort, torch, atol, rtol)``. ``error`` says why, when it failed
    before the comparison.
    """

    max_abs_diff: float
    passed: bool
    providers: tuple[str, ...]
    batch_size: int = 2
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        return data


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode, so the caller's model keeps its device, mode and hooks."""
    return copy.deepcopy(model).cpu().eval()


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # The exporter's deprecation notice and tracer warnings are not the caller's business.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            opset_version=max(opset, _DYNAMO_MIN_OPSET),
            dynamo=True,
            external_data=False,
            verbose=False,
            optimize=True,
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    exporter: Exporter = "auto",
) -> Path:
    """Export ``model`` to a single ONNX file at ``path``.

    Parameters
    ----------
    model
        The classifier; a CPU copy in eval mode is exported, the model itself is unchanged.
    path
        Destination; written through a temporary file and renamed, parents created.
    input_shape
        One sample's shape without the batch axis, e.g. ``(3, 32, 32)``.
    opset
        ONNX opset for the TorchScript exporter; the dynamo exporter uses at least 18.
    dynamic_batch
        Make the batch axis of ``input`` and ``logits`` symbolic.
    exporter
        ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (the first, then the second).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OnnxExportError
        When every exporter tried failed; the message holds each one's reason.
    """
    orders = {
        "auto": ("torchscript", "dynamo"),
        "torchscript": ("torchscript",),
        "dynamo": ("dynamo",),
    }
    if exporter not in orders:
        raise ValueError(f"unknown exporter {exporter!r}: use 'auto', 'torchscript' or 'dynamo'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runner = _cpu_eval_copy(model)
    # Batch 2, not 1: a batch of one invites exporters to specialise the batch axis.
    example = torch.zeros((2, *input_shape), dtype=_input_dtype(runner))
    failures: list[str] = []
    for name in orders[exporter]:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with torch.no_grad():
                if name == "torchscript":
                    _export_torchscript(runner, example, tmp, opset, dynamic_batch)
                else:
                    _export_dynamo(runner, example, tmp, opset, dynamic_batch)
            os.replace(tmp, path)
            return path
        except Exception as exc:  # each exporter fails in its own ways; try the next
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).strip()[:500]}")
        finally:
            tmp.unlink(missing_ok=True)
    raise OnnxExportError("ONNX export failed. " + " | ".join(failures))


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    batch_size: int = 2,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> OnnxCheck:
    """Check the ONNX file with ``onnx.checker`` and compare ONNX Runtime (CPU) with PyTorch.

    Both run on the same seeded standard-normal batch of ``batch_size`` samples; PyTorch
    runs a CPU eval copy, so the model is unchanged. Never raises for a bad file: the
    result's ``passed`` and ``error`` say what went wrong.
    """
    import onnx
    import onnxruntime as ort

    providers: tuple[str, ...] = ()
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError, or OSError for a missing file
        return OnnxCheck(float("inf"), False, providers, batch_size, f"onnx.checker: {exc}")

    runner = _cpu_eval_copy(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=generator, dtype=_input_dtype(runner))
    with torch.inference_mode():
        expected = runner(x).float().numpy()

    try:
        options = ort.SessionOptions()
        # Respect the caller's thread budget (torch.set_num_threads) in ORT as well.
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        providers = tuple(session.get_providers())
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    except Exception as exc:  # ORT raises its own exception types for bad graphs/inputs
        return OnnxCheck(float("inf"), False, providers, batch_size, f"onnxruntime: {exc}")

    got = np.asarray(got, dtype=np.float32)
    if got.shape != expected.shape:
        return OnnxCheck(
            float("inf"),
            False,
            providers,
            batch_size,
            f"output shape {got.shape} != PyTorch's {expected.shape}",
        )
    finite = bool(np.isfinite(got).all() and np.isfinite(expected).all())
    max_abs_diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    passed = finite and bool(np.allclose(got, expected, atol=atol, rtol=rtol))
    error = None if finite else "non-finite outputs"
    return OnnxCheck(max_abs_diff, passed, providers, batch_size, error)
