"""ONNX export: exact against PyTorch in ONNX Runtime, dynamic batch, caller's model intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cnc_core.onnx_export import OnnxCheck, export_onnx, verify_onnx
from tests.core.fixtures import tiny_convnet

SHAPE = (3, 8, 8)


def _ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x.numpy()})[0]


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_export_verify_and_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    model = tiny_convnet(seed=1)
    path = export_onnx(model, tmp_path / "out" / "model.onnx", SHAPE, exporter=exporter)  # type: ignore[arg-type]
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # one file, no leftovers

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    check = verify_onnx(model, path, SHAPE)
    assert isinstance(check, OnnxCheck)
    assert check.passed, check
    assert check.max_abs_diff < 1e-4 and check.error is None
    assert "CPUExecutionProvider" in check.providers

    generator = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        x = torch.randn(batch, *SHAPE, generator=generator)
        got = _ort_logits(path, x)
        assert got.shape == (batch, 10)
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-3)


def test_static_batch_rejects_other_batch_sizes(tmp_path: Path) -> None:
    path = export_onnx(tiny_convnet(), tmp_path / "static.onnx", SHAPE, dynamic_batch=False)
    assert verify_onnx(tiny_convnet(), path, SHAPE, batch_size=2).passed
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort_logits(path, torch.zeros(3, *SHAPE))


def test_caller_model_unchanged(tmp_path: Path) -> None:
    model = tiny_convnet(seed=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    verify_onnx(model, path, SHAPE)
    assert model.training and model.bn1.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The export is of eval mode (running BN statistics), not of the train-mode model.
    model.eval()
    assert verify_onnx(model, path, SHAPE).passed


def test_verify_detects_a_different_model(tmp_path: Path) -> None:
    path = export_onnx(tiny_convnet(seed=3), tmp_path / "m.onnx", SHAPE)
    check = verify_onnx(tiny_convnet(seed=4), path, SHAPE)
    assert not check.passed
    assert check.max_abs_diff > 1e-3 and check.error is None


def test_verify_reports_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx model")
    check = verify_onnx(tiny_convnet(), path, SHAPE)
    assert not check.passed and check.error
    assert check.to_dict()["passed"] is False


def test_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown exporter"):
        export_onnx(tiny_convnet(), tmp_path / "m.onnx", SHAPE, exporter="tf")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_from_a_cuda_model(tmp_path: Path) -> None:
    model = tiny_convnet(seed=6).cuda()
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    assert next(model.parameters()).is_cuda  # the caller's model stays where it was
    assert verify_onnx(model, path, SHAPE).passed
