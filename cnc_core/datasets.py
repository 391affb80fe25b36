"""Fashion-MNIST loading and shaping for CIFAR-shaped models.

The benchmark trains and evaluates on real Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017),
read from the original idx files (e.g. Debian's ``dataset-fashion-mnist`` package installs
them under ``/usr/share/datasets/fashion-mnist``). Images are padded from 28x28 to 32x32 and
repeated to 3 channels so CIFAR-10 architectures run unchanged; results built on them must
say Fashion-MNIST, not CIFAR-10.

This module never reads environment variables: callers pass the directory.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "normalize",
    "read_idx",
    "to_cifar_shape",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Per-channel statistics of the 60,000 TRAIN images after `to_cifar_shape` (pixel/255, padded
# with 2 px of zeros to 32x32; the 3 channels are copies so all three agree). Computed once
# with numpy in float64 over all pixels: mean 0.21900, std 0.33181. (Unpadded 28x28 images
# give the familiar 0.28604 / 0.35302; the zero border lowers both.)
FASHION_MNIST_MEAN: tuple[float, float, float] = (0.2190, 0.2190, 0.2190)
FASHION_MNIST_STD: tuple[float, float, float] = (0.3318, 0.3318, 0.3318)

# idx magic: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
_IDX_UBYTE = 0x08
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one gzip-compressed idx file of unsigned bytes (LeCun's MNIST format).

    Parameters
    ----------
    path : Path
        The ``*.gz`` file.
    ndim : int
        The expected number of dimensions (3 for images, 1 for labels).

    Returns
    -------
    numpy.ndarray
        A read-only uint8 array of the shape stored in the header.

    Raises
    ------
    ValueError
        On a wrong magic number, type code, dimension count or payload size.
    """
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx header")
    zero, dtype_code, file_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE:
        raise ValueError(f"{path}: bad idx magic {raw[:4].hex()} (want 0000 08 {ndim:02x})")
    if file_ndim != ndim:
        raise ValueError(f"{path}: idx file has {file_ndim} dimensions, expected {ndim}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(raw) - header_end
    if payload != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), payload is {payload}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def load_fashion_mnist(root: Path, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """Load one split of Fashion-MNIST from the idx files in ``root``.

    Parameters
    ----------
    root : Path
        Directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
    split : {"train", "test"}
        ``"test"`` reads the ``t10k`` files.

    Returns
    -------
    images : Tensor
        uint8, shape (N, 28, 28).
    labels : Tensor
        int64, shape (N,), values in 0..9.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_name, lbl_name = _FILES[split]
    images = read_idx(root / img_name, ndim=3)
    labels = read_idx(root / lbl_name, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{split}: images are {images.shape[1:]}, expected (28, 28)")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{split}: label {int(labels.max())} out of range 0..9")
    # np.frombuffer arrays are read-only; copy so torch owns writable memory.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_cifar_shape(images: Tensor) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) float32 in [0, 1]: pad 2 px of zeros, repeat 3 ch."""
    if images.dim() != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))  # (N, 32, 32)
    return x.unsqueeze(1).repeat(1, 3, 1, 1)  # (N, 3, 32, 32)


def normalize(
    x: Tensor, mean: tuple[float, ...] | Tensor, std: tuple[float, ...] | Tensor
) -> Tensor:
    """Per-channel ``(x - mean) / std`` for (N, C, H, W) or (C, H, W) tensors (not in place)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s
