"""Safe intake of uploaded checkpoints, strict loading with a readable report, and saving.

An uploaded checkpoint is hostile until proven otherwise. This module never unpickles
arbitrary Python objects: the format is detected from the file's content (never its name),
safetensors files are validated before they are mapped, and ``torch.save`` files are read
with ``torch.load(weights_only=True)`` only, with no fallback of any kind. Everything that is
refused raises :class:`CheckpointError`, whose message names the problem and the fix.

Formats accepted
----------------
* safetensors (preferred);
* a ``torch.save``'d state dict (zip format, torch >= 1.6), possibly wrapped in the usual
  training containers (``{"state_dict": ...}``, ``{"model": ...}``, ...);
* a legacy (pre-1.6) ``torch.save`` pickle, read by the same restricted unpickler.

Refused: pickled modules or any other Python object, TorchScript archives, ONNX, HDF5, text,
anything else; files over ``max_bytes``; non-finite weights.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_TENSORS",
    "load_checkpoint",
    "load_into",
    "read_state_dict",
    "save_state_dict",
]

DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_TENSORS = 100_000

# safetensors' own limit on the JSON header (safetensors/src/tensor.rs MAX_HEADER_SIZE).
_SAFETENSORS_MAX_HEADER = 100_000_000
# Keys under which training scripts commonly nest the model's state dict, most specific first.
_CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "net",
    "network",
    "module",
    "weights",
    "params",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
)
# Wrappers that prefix every key: DataParallel / DistributedDataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 20
# Parameter names of deep real networks stay well under this; a longer key is an attack on
# the string handling (prefix stripping is linear in key length per pass).
_MAX_KEY_CHARS = 1024
_SAVE_HINT = "save model.state_dict() with torch.save, or use safetensors"


class CheckpointError(ValueError):
    """A checkpoint was refused; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_state_dict(
    path: str | os.PathLike[str],
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from an untrusted file, on the CPU.

    Parameters
    ----------
    path
        The checkpoint. Its format is detected from its first bytes, not its extension.
    max_bytes
        Refuse files (and zip archives whose uncompressed content is) larger than this;
        ``None`` disables the bound.
    max_tensors
        Refuse checkpoints with more tensors than this.

    Returns
    -------
    dict[str, torch.Tensor]
        Plain (non-Parameter) CPU tensors with ``module.`` / ``_orig_mod.`` prefixes removed.

    Raises
    ------
    CheckpointError
        For anything that is not a clean, finite state dict; never executes pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            "the checkpoint file is empty (0 bytes): the upload was probably interrupted; "
            "upload it again"
        )
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(
            f"the checkpoint is {_fmt_bytes(size)} ({size} bytes), over the limit of "
            f"{_fmt_bytes(max_bytes)} ({max_bytes} bytes): upload only the model weights "
            "(no optimizer state), e.g. in half precision or as safetensors"
        )
    with path.open("rb") as f:
        head = f.read(64)

    kind = _sniff(head, size)
    if kind == "safetensors":
        raw: Any = _read_safetensors(path, size, max_tensors)
    elif kind == "zip":
        _check_torch_zip(path, max_bytes, max_tensors)
        raw = _torch_load_weights_only(path)
    elif kind == "pickle":
        raw = _torch_load_weights_only(path)
    else:
        raise CheckpointError(
            "not a checkpoint: expected safetensors or a torch.save'd state dict "
            f"(got {kind}); {_SAVE_HINT}"
        )

    state = _unwrap(raw)
    if len(state) > max_tensors:
        raise CheckpointError(
            f"the checkpoint holds {len(state)} tensors, over the limit of {max_tensors}: "
            "is this one image classifier's state dict?"
        )
    state = _strip_prefixes(state)
    _check_tensors(state, max_bytes)
    return state


def _sniff(head: bytes, size: int) -> str:
    """Name the format from the first bytes: 'safetensors', 'zip', 'pickle' or a guess."""
    # safetensors: u64 little-endian header length, then a JSON object.
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= _SAFETENSORS_MAX_HEADER:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # Pickle protocol >= 2 opens with PROTO (0x80) and the protocol number; torch's legacy
    # format is a sequence of such pickles.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return _guess(head, size)


def _guess(head: bytes, size: int) -> str:
    """A human description of a file that is no checkpoint, for the error message."""
    known = (
        (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
        (b"\x93NUMPY", "a NumPy .npy array"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"\x7fELF", "an executable (ELF)"),
        (b"PK\x05\x06", "an empty zip archive"),
        (b"7z\xbc\xaf", "a 7z archive"),
        (b"BZh", "a bzip2 archive"),
        (b"\xfd7zXZ", "an xz archive"),
        (b"GGUF", "a GGUF file"),
    )
    for magic, name in known:
        if head.startswith(magic):
            return name
    # An ONNX ModelProto is protobuf opening with field 1 (ir_version, varint) and usually
    # field 2 (producer_name) or 8 (opset_import).
    if len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in (0x12, 0x1A, 0x42):
        return "what looks like an ONNX model"
    if len(head) >= 2 and head[0] == 0x80:
        return f"a pickle of unsupported protocol {head[1]}"
    text = None
    for cut in range(4):  # the 64-byte head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        shown = text[:24].replace("\n", " ")
        return f"a text file starting {shown!r}"
    return f"{size} bytes starting 0x{head[:16].hex()}"


def _read_safetensors(path: Path, size: int, max_tensors: int) -> dict[str, torch.Tensor]:
    """Validate a safetensors header against the file, then load it on the CPU."""
    from safetensors.torch import load_file

    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))  # bounded by _sniff
        if 8 + header_len > size:
            raise CheckpointError(
                f"truncated safetensors file: header says at least {8 + header_len} bytes, "
                f"file has {size}; upload the complete file again"
            )
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"invalid safetensors file: its header is not valid JSON ({exc}); re-save the "
            "weights with safetensors.torch.save_file"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError("invalid safetensors file: its header is not a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > max_tensors:
        raise CheckpointError(
            f"the checkpoint holds {len(entries)} tensors, over the limit of {max_tensors}: "
            "is this one image classifier's state dict?"
        )
    data_end = 0
    for name, info in entries.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(
                f"invalid safetensors file: tensor {name!r} has malformed data_offsets "
                f"{offsets!r}; re-save the weights with safetensors.torch.save_file"
            )
        data_end = max(data_end, offsets[1])
    expected = 8 + header_len + data_end
    if expected > size:
        raise CheckpointError(
            f"truncated safetensors file: header says {expected} bytes, file has {size}; "
            "upload the complete file again"
        )
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, among others
        raise CheckpointError(
            f"invalid safetensors file: {_first_line(str(exc))}; re-save the weights with "
            "safetensors.torch.save_file"
        ) from None


def _check_torch_zip(path: Path, max_bytes: int | None, max_tensors: int) -> None:
    """Refuse zips that are no torch.save checkpoint, TorchScript archives and zip bombs."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"corrupt checkpoint: the zip archive cannot be read ({exc}); the upload may be "
            "truncated, upload the complete file again"
        ) from None
    names = [i.filename for i in infos]
    # torch.save writes <root>/data.pkl and <root>/data/<n>; torch.jit.save adds
    # <root>/constants.pkl and <root>/code/...
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(
            "TorchScript archives are not accepted (they carry code): export "
            "model.state_dict() with torch.save, or use safetensors"
        )
    if not any(n.endswith("data.pkl") and n.count("/") <= 1 for n in names):
        what = (
            "a NumPy .npz archive"
            if names and all(n.endswith(".npy") for n in names)
            else f"a zip archive of {len(names)} entries without data.pkl"
        )
        raise CheckpointError(
            "not a checkpoint: expected safetensors or a torch.save'd state dict "
            f"(got {what}); {_SAVE_HINT}"
        )
    # Each tensor storage is one entry; a few more hold metadata. Bounding the entries
    # bounds the work before unpickling.
    if len(names) > max_tensors + 16:
        raise CheckpointError(
            f"the checkpoint archive has {len(names)} entries, over the limit of "
            f"{max_tensors} tensors: is this one image classifier's state dict?"
        )
    if max_bytes is not None:
        unpacked = sum(i.file_size for i in infos)
        if unpacked > max_bytes:
            raise CheckpointError(
                f"the checkpoint unpacks to {_fmt_bytes(unpacked)} ({unpacked} bytes), over "
                f"the limit of {_fmt_bytes(max_bytes)} ({max_bytes} bytes): upload only the "
                "model weights, e.g. as safetensors"
            )


def _widened_allowlist() -> list[str]:
    """Globals outside torch that this process allow-listed for ``weights_only`` loads.

    ``torch.serialization.add_safe_globals`` widens what ``weights_only=True`` accepts for
    the whole process; torch registers a few of its own types, anything else would let an
    uploaded pickle construct that object, so reading untrusted files is then refused.
    """
    names = []
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        module = getattr(obj, "__module__", "") or ""
        if not (module == "torch" or module.startswith("torch.")):
            names.append(name or f"{module}.{getattr(obj, '__qualname__', repr(obj))}")
    return names


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load`` restricted to tensors and primitive containers. Never falls back."""
    widened = _widened_allowlist()
    if widened:
        raise RuntimeError(
            "refusing to read an untrusted checkpoint: this process allow-listed globals for "
            f"torch.load(weights_only=True) ({', '.join(widened[:5])}); remove the "
            "torch.serialization.add_safe_globals call"
        )
    try:
        # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot
        # override an explicit argument (torch/serialization.py), so the environment cannot
        # weaken this call.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # the restricted unpickler raises UnpicklingError; others vary
        reason = _torch_reason(str(exc))
        if _is_pickle_refusal(exc, reason):
            if _looks_like_pickled_module(path):
                raise CheckpointError(
                    "the checkpoint is a whole pickled nn.Module (torch.save(model)), not a "
                    f"state dict, and cnc never loads pickled Python objects ({reason}); "
                    f"{_SAVE_HINT}"
                ) from None
            raise CheckpointError(
                f"the checkpoint contains pickled Python objects ({reason}), which cnc "
                f"never loads; {_SAVE_HINT}"
            ) from None
        if "TorchScript" in reason:
            raise CheckpointError(
                "TorchScript archives are not accepted (they carry code): export "
                "model.state_dict() with torch.save, or use safetensors"
            ) from None
        raise CheckpointError(
            f"corrupt or unreadable checkpoint ({reason}); {_SAVE_HINT}"
        ) from None


def _looks_like_pickled_module(path: Path, limit: int = 64 * 1024**2) -> bool:
    """Whether the pickle holds an ``nn.Module``, by a plain byte search (nothing runs).

    A pickled module's state carries the attribute names ``_parameters`` and ``_modules``;
    that tells a user who ran ``torch.save(model)`` exactly what to change.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                entry = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
                if entry.file_size > limit:
                    return False
                data = zf.read(entry)
        else:
            with path.open("rb") as f:
                data = f.read(limit)
    except (OSError, StopIteration, zipfile.BadZipFile, ValueError):
        return False
    return b"_parameters" in data and b"_modules" in data


def _is_pickle_refusal(exc: BaseException, reason: str) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or "GLOBAL" in reason


def _torch_reason(message: str) -> str:
    """The informative line of torch's (long, advice-laden) weights_only error."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "WeightsUnpickler error" in line or "Unsupported" in line:
            line = line.removeprefix("WeightsUnpickler error:").strip()
            # Keep the first sentence; the rest is advice on allow-listing, which we refuse.
            cut = line.find(". Please")
            return (line[:cut] if cut > 0 else line)[:300].rstrip(".")
    for line in lines:
        if not line.startswith("Weights only load failed"):
            return line[:300]
    return lines[0][:300] if lines else "no reason given"


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no reason given"


# --------------------------------------------------------------------------------------------
# Unwrapping
# --------------------------------------------------------------------------------------------


def _tensor_items(obj: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _find_state(
    obj: Any, depth: int = 0, memo: dict[tuple[int, int], Any] | None = None
) -> dict[str, torch.Tensor] | None:
    """Find the model's state dict in ``obj`` (a flat dict of tensors, or a container).

    ``memo`` caches each (object, depth) visited: a pickle can reference one dict from
    many places, and without the cache a small file could make this search exponential.
    """
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    memo = {} if memo is None else memo
    token = (id(obj), depth)
    if token in memo:
        return memo[token]
    memo[token] = None  # also breaks reference cycles
    found: dict[str, torch.Tensor] | None = None
    # Known container keys first: a training checkpoint also holds optimizer state, which
    # is a dict as well and must not be mistaken for the model.
    for key in _CONTAINER_KEYS:
        if key in obj:
            found = _find_state(obj[key], depth + 1, memo)
            if found:
                break
    if not found:
        found = _tensor_items(obj) or None
    if not found:
        # Otherwise a single nested dict of tensors under an unusual key.
        skip = ("optimizer", "optimizer_state_dict", "scheduler")
        candidates = [
            s
            for s in (_find_state(v, depth + 1, memo) for k, v in obj.items() if k not in skip)
            if s
        ]
        found = candidates[0] if len(candidates) == 1 else None
    memo[token] = found
    return found


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a dict with keys [{shown}] and no tensors among them"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _unwrap(raw: Any) -> dict[str, torch.Tensor]:
    state = _find_state(raw)
    if not state:
        raise CheckpointError(
            f"no state dict found in the checkpoint: it holds {_describe(raw)}; expected a "
            "dict of tensors (model.state_dict()) or a dict with one under 'state_dict' or "
            f"'model'; {_SAVE_HINT}"
        )
    long_keys = [k for k in state if len(k) > _MAX_KEY_CHARS]
    if long_keys:
        raise CheckpointError(
            f"the checkpoint has {len(long_keys)} key(s) longer than {_MAX_KEY_CHARS} "
            f"characters (the first starts {long_keys[0][:40]!r}), which no parameter name is; "
            f"{_SAVE_HINT}"
        )
    return dict(state)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key (DataParallel, torch.compile)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    # torch.compile of a submodule leaves "._orig_mod." inside the keys.
    if any("._orig_mod." in k for k in state):
        state = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
    return state


def _check_tensors(state: dict[str, torch.Tensor], max_bytes: int | None) -> None:
    """Refuse exotic tensors, oversized views and non-finite values; makes tensors plain."""
    bad_layout = [k for k, t in state.items() if t.layout != torch.strided or t.is_quantized]
    if bad_layout:
        raise CheckpointError(
            f"sparse or quantized tensors are not accepted: {_listing(bad_layout, 5)}; save "
            "the float model's state_dict()"
        )
    if max_bytes is not None:
        # Many tensors can view one storage, so a small file can describe far more tensor
        # bytes than it holds; bound them before touching the values. Identical views (tied
        # weights) count once.
        views = {
            (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype): t
            for t in state.values()
        }
        total = sum(t.numel() * t.element_size() for t in views.values())
        if total > max_bytes:
            raise CheckpointError(
                f"the checkpoint's tensors add up to {_fmt_bytes(total)} ({total} bytes), over "
                f"the limit of {_fmt_bytes(max_bytes)} ({max_bytes} bytes); upload only the "
                "model weights"
            )
    nonfinite = []
    for key, tensor in state.items():
        if tensor.is_complex():
            raise CheckpointError(f"complex tensor {key!r} is not accepted in an image classifier")
        if tensor.is_floating_point():
            try:
                finite = bool(torch.isfinite(tensor).all())
            except (RuntimeError, NotImplementedError):  # e.g. float8 kernels missing
                finite = bool(torch.isfinite(tensor.float()).all())
            if not finite:
                nonfinite.append(key)
        # Parameters from a weights_only load are plain data; drop the subclass anyway.
        state[key] = tensor.detach().as_subclass(torch.Tensor)
    if nonfinite:
        raise CheckpointError(
            f"the checkpoint has NaN or infinite values in {len(nonfinite)} tensor(s): "
            f"{_listing(nonfinite, 5)}; the model diverged or the file is corrupt, upload a "
            "checkpoint from before the divergence"
        )


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly, in place, or explain every mismatch.

    Missing keys, unexpected keys and shape mismatches are listed key by key (at most 20 of
    each), with a hint on ``--arch`` / ``--num-classes`` / ``--width`` / ``--in-chans``
    guessed from the classifier and stem shapes. BatchNorm ``num_batches_tracked`` counters
    may be missing (old checkpoints lack them); they only count training steps.

    Raises
    ------
    CheckpointError
        When the checkpoint does not fit the model; the model is then left unchanged.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_report(expected, state, missing, unexpected, mismatched))
    try:
        # A shallow copy: BatchNorm's loader inserts absent num_batches_tracked keys.
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the checkpoint does not load into the model: {_first_line(str(exc))}; is "
            "--arch right?"
        ) from None


def _mismatch_report(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    parts = [
        f"the checkpoint does not match the model ({len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} wrong shape)"
    ]
    if mismatched:
        lines = [
            f"{k}: checkpoint {_shape(state[k])}, model {_shape(expected[k])}" for k in mismatched
        ]
        parts.append("shape mismatches:\n  " + _listing(lines, _MAX_LISTED, sep="\n  "))
    if missing:
        parts.append(
            "missing from the checkpoint:\n  "
            + _listing([f"{k} {_shape(expected[k])}" for k in missing], _MAX_LISTED, "\n  ")
        )
    if unexpected:
        parts.append(
            "unexpected in the checkpoint:\n  "
            + _listing([f"{k} {_shape(state[k])}" for k in unexpected], _MAX_LISTED, "\n  ")
        )
    parts.append("hint: " + _hint(expected, state, missing, unexpected, mismatched))
    return "\n".join(parts)


def _hint(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    """Guess which model option is wrong from the stem and classifier shapes."""
    suggestions: list[str] = []
    examples: list[str] = []
    if mismatched:
        convs = [k for k, t in expected.items() if k.endswith("weight") and t.dim() == 4]
        linears = [k for k, t in expected.items() if k.endswith("weight") and t.dim() == 2]
        stem = convs[0] if convs else None
        head = linears[-1] if linears else None
        if stem in mismatched:
            got, want = state[stem].shape, expected[stem].shape
            if got[1] != want[1]:
                suggestions.append(f"--in-chans {got[1]}")
            if got[0] != want[0]:
                suggestions.append(f"--width {got[0]}")
            examples.append(
                f"the checkpoint's {stem} has shape {_shape(state[stem])}, the model expects "
                f"{_shape(expected[stem])}"
            )
        if head in mismatched:
            got, want = state[head].shape, expected[head].shape
            if got[0] != want[0]:
                suggestions.append(f"--num-classes {got[0]}")
            if got[1] != want[1] and stem not in mismatched:
                suggestions.append(f"a width giving {got[1]} features (the model has {want[1]})")
            examples.append(
                f"the checkpoint's {head} has shape {_shape(state[head])}, the model expects "
                f"{_shape(expected[head])}"
            )
        if not examples:
            k = mismatched[0]
            examples.append(
                f"the checkpoint's {k} has shape {_shape(state[k])}, the model expects "
                f"{_shape(expected[k])}"
            )
    text = "is --arch / --num-classes / --width right?"
    if examples:
        text += " " + "; ".join(examples)
    if suggestions:
        text += "; try " + ", ".join(dict.fromkeys(suggestions))
    # Nothing in common at all: most likely another architecture or naming scheme.
    if (missing or unexpected) and not (set(expected) & set(state)):
        text += (
            f"; no key in common: the model's keys look like {list(expected)[:3]}, the "
            f"checkpoint's like {list(state)[:3]} (another architecture?)"
        )
    return text


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> nn.Module:
    """Read an untrusted checkpoint and load it strictly into ``model`` (in place).

    Returns ``model`` itself, in eval mode. See :func:`read_state_dict` and
    :func:`load_into` for what is refused.
    """
    state = read_state_dict(path, max_bytes=max_bytes, max_tensors=max_tensors)
    load_into(model, state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_state_dict(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a model's (or a state dict's) tensors as one safetensors file.

    Tensors are copied to contiguous CPU clones, so tensors sharing storage (tied weights,
    views) are written as independent copies, which safetensors requires. The file is
    written to a temporary name and renamed, so readers never see a half-written file.
    The model is not changed.

    Returns
    -------
    Path
        ``path``.
    """
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _listing(items: list[str], cap: int, sep: str = ", ") -> str:
    shown = sep.join(items[:cap])
    if len(items) > cap:
        shown += f"{sep}... and {len(items) - cap} more"
    return shown


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
