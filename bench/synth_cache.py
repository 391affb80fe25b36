"""Synthetic images of zoo models, cached on disk and shared by the benchmarks.

ZeroQ synthesis is the slowest stage on CPU (minutes per model) and depends only on the
original model and the synthesis settings, so ``bench/explore_purify.py`` and
``bench/backdoor.py`` keep its output under ``bench/.cache/explore/`` (not committed), keyed
by the model's weights and the settings. Each cache file has a JSON sidecar with the seconds
the synthesis took when it was made, and on what, so a benchmark that reuses it can still
report an honest purification wall time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from bench.common import machine
from bench.zoo import find_zoo_model
from cnc_core.purify.synthesis import SynthesisConfig, synthesize

CACHE = Path(__file__).resolve().parent / ".cache" / "explore"


def model_key(attack: str, mode: str, width: int = 16) -> str:
    """Cache key of a zoo model: its name and the first bytes of its weights' SHA-256, so a
    retrained model never reuses another model's synthetic images."""
    found = find_zoo_model(attack, mode, width)
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()[:8] if found else "none"
    suffix = "" if width == 16 else f"-w{width}"
    return f"{attack}-{mode}{suffix}-{digest}"


def synth_key(s: SynthesisConfig) -> str:
    """The settings part of a cache name: every setting that changes the images (batch
    statistics depend on the batch size, so it is part of the key)."""
    return (
        f"n{s.num_images}-it{s.iterations}-b{s.batch_size}-lr{s.lr:g}-cw{s.class_weight:g}"
        f"-{s.statistics}-s{s.seed}"
        + (f"-tv{s.tv_weight:g}" if s.tv_weight else "")
        + ("" if s.channels_last else "-nchw")  # the same images to float rounding only
    )


def cached_synthetic(
    model: torch.nn.Module,
    config: SynthesisConfig,
    key: str,
    *,
    mean: tuple[float, ...] | float,
    std: tuple[float, ...] | float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict]:
    """``synthesize(model, config)``, from the cache when present.

    Returns the images (on ``device``) and the record of how they were made:
    ``{"seconds", "machine", "cached"}`` (``seconds`` is None for a cache file older than
    the sidecars).
    """
    s = config
    path = CACHE / f"{key}-synth-{synth_key(s)}.pt"
    sidecar = path.with_suffix(".json")
    if path.exists():
        record = json.loads(sidecar.read_text()) if sidecar.exists() else {"seconds": None}
        images = torch.load(path, weights_only=True).to(device)
        return images, {**record, "cached": True}
    t0 = time.perf_counter()
    images = synthesize(model, s, mean=mean, std=std, device=device)
    record = {"seconds": time.perf_counter() - t0, "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(images.cpu(), path)
    sidecar.write_text(json.dumps(record))
    return images, {**record, "cached": False}
