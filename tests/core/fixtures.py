"""Plain factories for the core tests: tiny seeded models and hostile files.

The hostile files carry a live payload (a ``__reduce__`` that creates a marker file), so a
test can prove both that the payload works under plain ``pickle`` and that cnc never runs it.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from pathlib import Path

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A few-hundred-parameter CNN: stem conv + BN, a grouped strided conv, a linear head.

    Shapes for a (N, in_chans, 8, 8) input: stem -> (N, width, 8, 8); block (groups=2,
    stride 2) -> (N, 2*width, 4, 4); pool + flatten -> (N, 2*width); fc -> (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, width: int = 4, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_convnet(
    num_classes: int = 10, width: int = 4, in_chans: int = 3, seed: int = 0
) -> TinyConvNet:
    """A seeded :class:`TinyConvNet` in eval mode with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = TinyConvNet(num_classes=num_classes, width=width, in_chans=in_chans)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


class MarkerPayload:
    """Unpickling this object runs ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def write_raw_evil_pickle(path: Path, marker: Path) -> Path:
    """A plain ``pickle.dump`` (protocol 2) of a state dict whose value runs code."""
    with path.open("wb") as f:
        pickle.dump({"conv1.weight": MarkerPayload(marker)}, f, protocol=2)
    return path


def write_evil_torch_save(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """``torch.save`` of a dict holding a code-running object (zip or legacy format)."""
    payload = {"state_dict": {"fc.weight": torch.zeros(2, 2), "fc.bias": MarkerPayload(marker)}}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


def write_truncated_safetensors(path: Path, state: dict[str, torch.Tensor], cut: int) -> Path:
    """A valid safetensors file with its last ``cut`` bytes removed."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    return path


def write_safetensors_header(path: Path, header: bytes, body: bytes = b"") -> Path:
    """A file laid out as safetensors (u64 LE header length, header, body), for bad headers."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


class _RebuildFromDeclaredStorage:
    """Pickles as torch's own tensor rebuild call on a persistent storage id."""

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (
            torch._utils._rebuild_tensor_v2,
            ("STORAGE", 0, (4,), (1,), False, collections.OrderedDict()),
        )


def write_legacy_declaring_storage(path: Path, declared_numel: int) -> Path:
    """A legacy-format torch checkpoint whose storage claims ``declared_numel`` floats but
    holds only 4, like a hostile file asking the loader to allocate far more than it holds.
    ``declared_numel=4`` gives a valid file (a control)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if obj == "STORAGE":
                return ("storage", torch.FloatStorage, "0", "cpu", declared_numel, None)
            return None

    with path.open("wb") as f:
        pickle.dump(MAGIC_NUMBER, f, protocol=2)
        pickle.dump(PROTOCOL_VERSION, f, protocol=2)
        sys_info = {
            "protocol_version": PROTOCOL_VERSION,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        }
        pickle.dump(sys_info, f, protocol=2)
        _Pickler(f, protocol=2).dump({"fc.weight": _RebuildFromDeclaredStorage()})
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", 4) + b"\0" * 16)  # the storage: numel, then 4 zero floats
    return path
