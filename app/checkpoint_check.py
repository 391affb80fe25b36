"""Cheap checks of an uploaded checkpoint's container, without torch.

The API sees only the first and last bytes of the upload (kept while streaming). It accepts
two containers, both loadable without running code:

- safetensors: 8-byte little-endian header length, then a JSON header naming every tensor.
- a torch zip (``torch.save`` since 1.6): a zip holding ``<name>/data.pkl``; the pickle inside
  is loaded by the worker with ``torch.load(weights_only=True)``, which refuses code.

TorchScript archives, legacy raw pickles and anything else are refused here with the fix.
The worker's ``read_state_dict`` is the full check; this only rejects obvious mistakes early.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

FIX = "save model.state_dict() with torch.save, or use safetensors"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class CheckpointRejected(ValueError):
    """The upload is not an accepted checkpoint; the message names the problem and the fix."""


@dataclass(frozen=True)
class CheckResult:
    format: str  # "safetensors" | "torch-zip"
    tensors: int | None = None  # count, when the header was fully seen


def check_checkpoint(head: bytes, tail: bytes, size: int) -> CheckResult:
    """Classify an upload from its first bytes ``head``, last bytes ``tail`` and ``size``.

    Raises
    ------
    CheckpointRejected
        With a readable reason and the fix.
    """
    if size == 0:
        raise CheckpointRejected(f"the file is empty; {FIX}")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _check_zip(tail, size)
    if head[:1] == b"\x80" or head[:2] in (b"(d", b"}q", b"}\x94"):
        raise CheckpointRejected(
            "this is a legacy (non-zip) pickle file, which can run code when loaded and is not "
            f"accepted; {FIX}"
        )
    if size >= 8:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= MAX_SAFETENSORS_HEADER and header_len <= size - 8:
            return _check_safetensors(head, size, header_len)
    raise CheckpointRejected(
        f"unrecognised file format (neither safetensors nor a torch zip); {FIX}"
    )


def _check_safetensors(head: bytes, size: int, header_len: int) -> CheckResult:
    if head[8:9] != b"{":
        raise CheckpointRejected(f"not a safetensors file: the header is not a JSON object; {FIX}")
    if len(head) < 8 + header_len:
        return CheckResult("safetensors")  # a huge header: the worker checks the rest
    try:
        header = json.loads(head[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointRejected(f"safetensors header is not valid JSON ({exc}); {FIX}") from None
    if not isinstance(header, dict):
        raise CheckpointRejected(f"safetensors header is not a JSON object; {FIX}")
    end = 0
    count = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
        ):
            raise CheckpointRejected(f"safetensors entry {name!r} lacks dtype/shape/offsets")
        end = max(end, int(entry["data_offsets"][1]))
        count += 1
    if count == 0:
        raise CheckpointRejected("the safetensors file holds no tensors")
    if 8 + header_len + end != size:
        raise CheckpointRejected(
            f"safetensors file is truncated or padded: header says {8 + header_len + end} "
            f"bytes, got {size}"
        )
    return CheckResult("safetensors", count)


def _zip_names(tail: bytes, size: int) -> list[str] | None:
    """File names from the zip's central directory, when it lies within ``tail``."""
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        return None
    entries, cd_size, cd_offset = struct.unpack("<HII", tail[pos + 10 : pos + 20])
    if cd_offset == 0xFFFFFFFF or entries == 0xFFFF:  # zip64: read its locator
        loc = tail.rfind(b"PK\x06\x07", 0, pos)
        if loc < 0:
            return None
        (eocd64,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
        start = eocd64 - (size - len(tail))
        if start < 0:
            return None
        entries, cd_size, cd_offset = struct.unpack("<QQQ", tail[start + 32 : start + 56])
    start = cd_offset - (size - len(tail))
    if start < 0:
        return None
    names: list[str] = []
    p = start
    for _ in range(entries):
        if tail[p : p + 4] != b"PK\x01\x02":
            return None
        name_len, extra_len, comment_len = struct.unpack("<HHH", tail[p + 28 : p + 34])
        names.append(tail[p + 46 : p + 46 + name_len].decode("utf-8", "replace"))
        p += 46 + name_len + extra_len + comment_len
    return names


def _check_zip(tail: bytes, size: int) -> CheckResult:
    names = _zip_names(tail, size)
    if names is None:
        raise CheckpointRejected(f"the zip archive is truncated or unreadable; {FIX}")
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        raise CheckpointRejected(
            f"this is a TorchScript archive (torch.jit.save), which is not accepted; {FIX}"
        )
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointRejected(f"a zip file, but not a torch checkpoint (no data.pkl); {FIX}")
    return CheckResult("torch-zip")
