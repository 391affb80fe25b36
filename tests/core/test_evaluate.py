from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cnc_core.evaluate import accuracy, attack_success_rate, load_eval_npz, predict


class PixelOracle(nn.Module):
    """Predicts class round(9 * x[0, 0, 0]) of its (normalised) input; records its modes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_inference_mode: list[bool] = []
        self.seen_training: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen_inference_mode.append(torch.is_inference_mode_enabled())
        self.seen_training.append(self.training)
        cls = (x[:, 0, 0, 0] * 9).round().long().clamp(0, 9)
        return nn.functional.one_hot(cls, 10).float()


def _coded_images(classes: list[int]) -> Tensor:
    x = torch.zeros(len(classes), 3, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float32) / 9
    return x


IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def test_accuracy_exact_and_batched() -> None:
    classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    x = _coded_images(classes)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 0, 0])  # 7 of 10 right
    model = PixelOracle().train()
    assert accuracy(model, x, labels, **IDENTITY, batch_size=3) == pytest.approx(70.0)
    assert len(model.seen_inference_mode) == 4  # ceil(10 / 3) batches
    assert all(model.seen_inference_mode) and not any(model.seen_training)


def test_asr_counts_attack_labels() -> None:
    x = _coded_images([0, 0, 0, 5])
    assert attack_success_rate(PixelOracle(), x, torch.tensor([0, 0, 0, 0]), **IDENTITY) == 75.0


def test_normalisation_applied_inside() -> None:
    # Pixel 0.5 normalised with mean 0.5 / std 1 reaches the model as 0 -> class 0.
    x = torch.full((2, 3, 4, 4), 0.5)
    out = predict(PixelOracle(), x, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    assert out.tolist() == [0, 0]


def test_length_mismatch_and_empty() -> None:
    with pytest.raises(ValueError, match="labels"):
        accuracy(PixelOracle(), _coded_images([1, 2]), torch.tensor([1]), **IDENTITY)
    with pytest.raises(ValueError, match="empty"):
        accuracy(
            PixelOracle(), torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), **IDENTITY
        )


def test_load_npz_uint8_nhwc(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4])
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    x, y = load_eval_npz(tmp_path / "d.npz")
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[2, 1], torch.from_numpy(images[2, :, :, 1]).float() / 255)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]


def test_load_npz_float_nchw_gray(tmp_path: Path) -> None:
    images = np.random.default_rng(1).random((4, 1, 6, 6)).astype(np.float64)
    np.savez(tmp_path / "d.npz", images=images, labels=np.zeros(4, dtype=np.int32))
    x, _ = load_eval_npz(tmp_path / "d.npz")
    assert x.shape == (4, 1, 6, 6) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(images).float())


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((2, 3, 4, 4), np.uint8)}, "labels"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, int)}, "4-D"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": np.zeros(3, int)}, "2 images"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": np.zeros((2, 1), int)}, "1-D"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": np.zeros(2)}, "integers"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": -np.ones(2, int)}, ">= 0"),
        ({"images": np.full((2, 3, 4, 4), 2.0), "labels": np.zeros(2, int)}, r"\[0, 1\]"),
        ({"images": np.full((2, 3, 4, 4), np.nan), "labels": np.zeros(2, int)}, "NaN"),
        ({"images": np.zeros((2, 3, 4, 4), np.int16), "labels": np.zeros(2, int)}, "uint8"),
        ({"images": np.zeros((2, 5, 4, 4), np.uint8), "labels": np.zeros(2, int)}, "channel"),
        ({"images": np.zeros((0, 3, 4, 4), np.uint8), "labels": np.zeros(0, int)}, "empty"),
    ],
)
def test_load_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_eval_npz(tmp_path / "d.npz")


def test_load_npz_refuses_pickles_and_garbage(tmp_path: Path) -> None:
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, {"b": 2}]
    np.savez(tmp_path / "p.npz", images=np.zeros((2, 3, 4, 4), np.uint8), labels=objects)
    with pytest.raises(ValueError, match="pickle"):
        load_eval_npz(tmp_path / "p.npz")
    (tmp_path / "g.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError):
        load_eval_npz(tmp_path / "g.npz")
