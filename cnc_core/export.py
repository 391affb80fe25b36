"""Saving and loading compact models without pickles.

A compact model is two files (style.md principle 9, as in Torch-Pruning's replayable
surgery): ``model.safetensors`` (the weights) and ``manifest.json`` (the architecture,
its input contract and the surgery record). :func:`load_compact` rebuilds the skeleton
from the registry, replays the surgery, and loads the weights: no code is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cnc_core.compress import apply_surgery

MANIFEST_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ModelSpec:
    """How to build the (uncompressed) architecture and what input it expects."""

    arch: str | None  # registry name; None for a user-supplied module
    num_classes: int
    in_chans: int = 3
    width: int | None = None
    input_size: int = 32
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    extra: dict[str, Any] = field(default_factory=dict)  # further create_model kwargs

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.input_size, self.input_size)

    def build(self) -> nn.Module:
        """A fresh, randomly initialised skeleton of the original architecture."""
        if self.arch is None:
            raise ValueError("this model is not from the registry: pass base_model")
        from cnc_core.models import create_model

        kwargs: dict[str, Any] = dict(self.extra)
        if self.width is not None:
            kwargs["width"] = self.width
        return create_model(
            self.arch, num_classes=self.num_classes, in_chans=self.in_chans, **kwargs
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        data["mean"] = tuple(data.get("mean", (0.0,)))
        data["std"] = tuple(data.get("std", (1.0,)))
        return cls(**data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_compact(
    model: nn.Module,
    out_dir: Path,
    spec: ModelSpec,
    surgery: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``model.safetensors`` and ``manifest.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "producer": "cnc"})
    manifest = {
        "format": "cnc-compact",
        "version": MANIFEST_VERSION,
        "model": asdict(spec),
        "input_shape": list(spec.input_shape),
        "surgery": surgery,
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights)},
        "params": sum(p.numel() for p in model.parameters()),
        **(extra or {}),
    }
    manifest_path = out_dir / MANIFEST_FILE
    manifest_path.write_text(json.dumps(manifest, indent=2, default=json_default))
    return weights, manifest_path


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} holds no {MANIFEST_FILE}: not a cnc compact model") from None
    if manifest.get("format") != "cnc-compact":
        raise ValueError(f"{path} is not a cnc compact-model manifest")
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {manifest['version']}; upgrade cnc")
    return manifest


def load_compact(
    directory: Path | str, base_model: nn.Module | None = None, *, verify: bool = True
) -> nn.Module:
    """Rebuild a compact model saved by :func:`save_compact`, in eval mode on CPU.

    ``base_model``: an uncompressed skeleton for models outside the registry (changed in
    place). ``verify`` checks the weights' sha256 against the manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = ModelSpec.from_dict(manifest["model"])
    weights = directory / manifest["weights"]["file"]
    if verify and _sha256(weights) != manifest["weights"]["sha256"]:
        raise ValueError(f"{weights} does not match the sha256 in the manifest")
    model = base_model if base_model is not None else spec.build()
    apply_surgery(model, manifest["surgery"])
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the rebuilt model: missing {sorted(missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    return model.eval()


def json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
