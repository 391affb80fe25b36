"""Clean accuracy, attack success rate, and loading a user's evaluation set.

Inputs are images in [0, 1]; normalisation with the model's training mean/std happens here,
so triggers are always applied in pixel space. ASR follows the usual definition (BackdoorBench;
see :func:`cnc_core.backdoors.make_poisoned_testset`): the share of triggered test images,
target-class images excluded for all-to-one, that the model assigns the attack's label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cnc_core.datasets import normalize

__all__ = ["accuracy", "attack_success_rate", "load_eval_npz", "predict"]


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: Tensor,
    *,
    mean: tuple[float, ...] | Tensor,
    std: tuple[float, ...] | Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Predicted class per image (int64, on CPU). The model is put in eval mode (in place)."""
    model.eval()
    preds = []
    for x in images.split(batch_size):
        x = normalize(x.to(device=device, dtype=torch.float32), mean, std)
        preds.append(model(x).argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _rate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: tuple[float, ...] | Tensor,
    std: tuple[float, ...] | Tensor,
    batch_size: int,
    device: torch.device | str,
) -> float:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("empty evaluation set")
    pred = predict(model, images, mean=mean, std=std, batch_size=batch_size, device=device)
    return 100.0 * float((pred == labels.cpu()).double().mean())


def accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    mean: tuple[float, ...] | Tensor,
    std: tuple[float, ...] | Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy in percent on clean images in [0, 1]."""
    return _rate(model, images, labels, mean, std, batch_size, device)


def attack_success_rate(
    model: nn.Module,
    poisoned_images: Tensor,
    attack_labels: Tensor,
    *,
    mean: tuple[float, ...] | Tensor,
    std: tuple[float, ...] | Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> float:
    """Percent of triggered images classified as the attack's label (see module docstring)."""
    return _rate(model, poisoned_images, attack_labels, mean, std, batch_size, device)


def load_eval_npz(path: Path) -> tuple[Tensor, Tensor]:
    """Read a user's evaluation set: ``images`` and ``labels`` arrays in an ``.npz``.

    ``images`` is (N, C, H, W) or (N, H, W, C) with C in {1, 3}, uint8 (0..255) or float in
    [0, 1]; ``labels`` is (N,) integers >= 0. Pickled objects are refused.

    Returns
    -------
    images : Tensor
        float32 (N, C, H, W) in [0, 1].
    labels : Tensor
        int64 (N,).

    Raises
    ------
    ValueError
        On missing arrays, wrong shapes, dtypes, ranges or lengths, or a non-npz file.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            names = set(npz.files)
            if not {"images", "labels"} <= names:
                raise ValueError(f"npz must hold 'images' and 'labels', found {sorted(names)}")
            images, labels = npz["images"], npz["labels"]
    except ValueError:
        raise  # ours above, or numpy refusing a pickle: already clear
    except Exception as exc:  # OSError, EOFError, zipfile.BadZipFile, a truncated member...
        raise ValueError(f"not a readable .npz file: {exc}") from exc

    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (N,C,H,W) or (N,H,W,C), got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("empty evaluation set")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0")

    if images.shape[1] in (1, 3):
        chw = images
    elif images.shape[3] in (1, 3):
        chw = images.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    else:
        raise ValueError(f"cannot find a channel axis of size 1 or 3 in shape {images.shape}")

    if images.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(chw)).to(torch.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise ValueError("images contain NaN or infinity")
        if images.min() < 0.0 or images.max() > 1.0:
            raise ValueError("float images must lie in [0, 1]")
        x = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return x, torch.from_numpy(labels.astype(np.int64))
