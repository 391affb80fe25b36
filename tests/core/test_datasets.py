from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cnc_core.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    normalize,
    read_idx,
    to_cifar_shape,
)

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
HAS_REAL = (REAL_ROOT / "t10k-images-idx3-ubyte.gz").is_file()


def _write_idx(path: Path, array: np.ndarray, magic_type: int = 0x08) -> None:
    header = struct.pack(">HBB", 0, magic_type, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _write_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture
def tiny_root(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 3], dtype=np.uint8)
    _write_split(tmp_path, "t10k", images, labels)
    return tmp_path, images, labels


def test_load_synthetic_idx(tiny_root: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, labels = tiny_root
    x, y = load_fashion_mnist(root, "test")
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert np.array_equal(x.numpy(), images)
    x[0, 0, 0] = 7  # tensors own writable memory (not the read-only frombuffer view)


def test_bad_magic_rejected(tmp_path: Path) -> None:
    _write_idx(tmp_path / "bad.gz", np.zeros((2, 28, 28), np.uint8), magic_type=0x0D)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad.gz", ndim=3)


def test_wrong_ndim_rejected(tmp_path: Path) -> None:
    _write_idx(tmp_path / "lbl.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="dimensions"):
        read_idx(tmp_path / "lbl.gz", ndim=3)


def test_truncated_payload_rejected(tmp_path: Path) -> None:
    header = struct.pack(">HBBIII", 0, 0x08, 3, 2, 28, 28)
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(header + bytes(28 * 28))  # one image, header says two
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short.gz", ndim=3)


def test_count_mismatch_rejected(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_fashion_mnist(tmp_path, "train")


def test_bad_split_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, "val")  # type: ignore[arg-type]


def test_to_cifar_shape() -> None:
    x = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    x[1] = 51
    out = to_cifar_shape(x)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.all(out[:, :, :2] == 0) and torch.all(out[:, :, -2:] == 0)
    assert torch.all(out[:, :, :, :2] == 0) and torch.all(out[:, :, :, -2:] == 0)
    assert torch.all(out[0, :, 2:30, 2:30] == 1.0)
    assert torch.allclose(out[1, :, 2:30, 2:30], torch.tensor(0.2))
    assert torch.equal(out[:, 0], out[:, 2])


def test_normalize() -> None:
    x = torch.rand(4, 3, 5, 5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c] - mean[c]) / std[c])
    assert torch.allclose(normalize(x[0], mean, std), out[0])  # (C, H, W) too


@pytest.mark.skipif(not HAS_REAL, reason="Debian dataset-fashion-mnist not installed")
def test_real_test_split_and_constants() -> None:
    x, y = load_fashion_mnist(REAL_ROOT, "test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10
    padded = to_cifar_shape(x)
    # The constants are train-set statistics; the test split agrees to about 0.005.
    assert abs(float(padded.mean()) - FASHION_MNIST_MEAN[0]) < 0.01
    assert abs(float(padded.std()) - FASHION_MNIST_STD[0]) < 0.01
