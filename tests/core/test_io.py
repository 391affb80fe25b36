"""Checkpoint intake: hostile files are refused without running code; good ones load."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnc_core.io import (
    CheckpointError,
    load_checkpoint,
    load_into,
    read_state_dict,
    save_state_dict,
)
from tests.core.fixtures import (
    MarkerPayload,
    tiny_convnet,
    write_evil_torch_save,
    write_legacy_declaring_storage,
    write_raw_evil_pickle,
    write_safetensors_header,
    write_truncated_safetensors,
)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ good files load


def test_safetensors_roundtrip_and_load_checkpoint(tmp_path: Path) -> None:
    src = tiny_convnet(seed=1)
    path = save_state_dict(src, tmp_path / "m.safetensors")
    state = read_state_dict(path)
    _assert_same_state(state, src.state_dict())
    assert all(type(t) is torch.Tensor for t in state.values())

    dst = tiny_convnet(seed=2).train()
    out = load_checkpoint(path, dst)
    assert out is dst and not dst.training
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_state_dict_loads(tmp_path: Path, legacy: bool) -> None:
    src = tiny_convnet(seed=3)
    path = tmp_path / "m.pt"
    torch.save(src.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    _assert_same_state(read_state_dict(path), src.state_dict())


def test_format_comes_from_content_not_extension(tmp_path: Path) -> None:
    src = tiny_convnet()
    st_named_pt = save_state_dict(src, tmp_path / "weights.pt")
    pt_named_onnx = tmp_path / "weights.onnx"
    torch.save(src.state_dict(), pt_named_onnx)
    _assert_same_state(read_state_dict(st_named_pt), src.state_dict())
    _assert_same_state(read_state_dict(pt_named_onnx), src.state_dict())


def _wrapped(sd: dict[str, torch.Tensor], how: str) -> object:
    if how == "state_dict":
        return {"state_dict": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    if how == "model":
        return {"model": sd, "best_acc": 0.9}
    if how == "net":
        return {"net": sd}
    if how == "model_state_dict+module":
        return {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}
    if how == "module_prefix":
        return {f"module.{k}": v for k, v in sd.items()}
    if how == "orig_mod_prefix":
        return {f"module._orig_mod.{k}": v for k, v in sd.items()}
    if how == "nested":
        return {"checkpoint": {"model": {"state_dict": sd}}, "args": {"lr": 0.1}}
    if how == "ema_only":
        return {"ema": sd, "step": 10}
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "state_dict",
        "model",
        "net",
        "model_state_dict+module",
        "module_prefix",
        "orig_mod_prefix",
        "nested",
        "ema_only",
    ],
)
def test_wrapped_containers_unwrap(tmp_path: Path, how: str) -> None:
    src = tiny_convnet(seed=4)
    path = tmp_path / "ckpt.pth"
    torch.save(_wrapped(src.state_dict(), how), path)
    state = read_state_dict(path)
    _assert_same_state(state, src.state_dict())
    load_into(tiny_convnet(seed=5), state)


def test_primary_state_dict_wins_over_ema(tmp_path: Path) -> None:
    main, ema = tiny_convnet(seed=6).state_dict(), tiny_convnet(seed=7).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": ema, "state_dict": main}, path)
    _assert_same_state(read_state_dict(path), main)


def test_save_state_dict_handles_shared_tensors(tmp_path: Path) -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # tied weights share storage
    model = nn.Sequential(first, second)
    state = {**model.state_dict(), "view": first.weight[:, :2]}  # a non-contiguous view
    path = save_state_dict(state, tmp_path / "tied.safetensors")
    loaded = read_state_dict(path)
    assert torch.equal(loaded["1.weight"], loaded["0.weight"])
    assert torch.equal(loaded["view"], first.weight[:, :2])
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ hostile pickles


def test_raw_pickle_payload_is_live_but_never_run(tmp_path: Path) -> None:
    # Control: plain pickle runs the payload, so the assertions below can fail.
    control_marker = tmp_path / "control_marker"
    control = write_raw_evil_pickle(tmp_path / "control.pkl", control_marker)
    with control.open("rb") as f:
        pickle.load(f)  # noqa: S301 - deliberately unsafe, on our own file
    assert control_marker.exists()

    marker = tmp_path / "marker"
    path = write_raw_evil_pickle(tmp_path / "evil.pkl", marker)
    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        read_state_dict(path)
    assert "system" in str(info.value)  # torch's reason names the refused global
    assert "state_dict" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_payload_is_never_run(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "marker"
    path = write_evil_torch_save(tmp_path / "evil.pt", marker, legacy=legacy)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path, tiny_convnet())
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny_convnet(), path)
    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        read_state_dict(path)
    message = str(info.value)
    assert "state_dict()" in message and "nn.Module" in message
    assert "TinyConvNet" in message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused(tmp_path: Path, how: str) -> None:
    model = tiny_convnet()
    scripted = (
        torch.jit.script(model)
        if how == "script"
        else torch.jit.trace(model, torch.zeros(1, 3, 8, 8))
    )
    path = tmp_path / "ts.pt"
    torch.jit.save(scripted, str(path))
    with pytest.raises(CheckpointError, match="TorchScript archives are not accepted") as info:
        read_state_dict(path)
    assert "state_dict()" in str(info.value)


# ------------------------------------------------------------------ malformed files


def test_truncated_safetensors(tmp_path: Path) -> None:
    state = tiny_convnet().state_dict()
    path = write_truncated_safetensors(tmp_path / "t.safetensors", state, cut=10)
    full = path.stat().st_size + 10
    with pytest.raises(CheckpointError, match="truncated safetensors file") as info:
        read_state_dict(path)
    assert f"header says {full} bytes, file has {full - 10}" in str(info.value)


def test_safetensors_header_cut_short(tmp_path: Path) -> None:
    path = write_safetensors_header(tmp_path / "h.safetensors", b'{"a": {"dtype": "F32", ')
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "header",
    [b"{not json}", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', b"{}"],
)
def test_malformed_safetensors_header(tmp_path: Path, header: bytes) -> None:
    path = write_safetensors_header(tmp_path / "bad.safetensors", header, body=b"\0" * 8)
    with pytest.raises(CheckpointError, match="safetensors|no state dict"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("content", "guess"),
    [
        (np.random.default_rng(0).bytes(4096), "bytes starting 0x"),
        (b"epoch,loss\n1,0.5\n2,0.4\n", "text file"),
        (("a" + "é" * 40).encode(), "text file"),  # the 64-byte head splits an "é"
        (b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "HDF5"),
        (b"\x08\x07\x12\x07pytorch\x1a\x032.0" + b"\0" * 32, "ONNX"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes, guess: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint") as info:
        read_state_dict(path)
    assert guess in str(info.value)


def test_npz_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a checkpoint.*npz"):
        read_state_dict(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")


def test_oversize_file_names_both_sizes(tmp_path: Path) -> None:
    path = save_state_dict(tiny_convnet(), tmp_path / "m.safetensors")
    size = path.stat().st_size
    with pytest.raises(CheckpointError, match="over the limit") as info:
        read_state_dict(path, max_bytes=1000)
    assert f"({size} bytes)" in str(info.value) and "(1000 bytes)" in str(info.value)


def test_zip_that_unpacks_too_large(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * 2_000_000)
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="unpacks to"):
        read_state_dict(path, max_bytes=1_000_000)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_too_many_tensors(tmp_path: Path, fmt: str) -> None:
    state = {f"t{i}": torch.zeros(1) for i in range(30)}
    path = tmp_path / "many"
    if fmt == "safetensors":
        save_state_dict(state, path)
    else:
        torch.save(state, path)
    with pytest.raises(CheckpointError, match="30 tensors|entries"):
        read_state_dict(path, max_tensors=10)
    assert len(read_state_dict(path, max_tensors=30)) == 30


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_name_the_key(tmp_path: Path, bad: float) -> None:
    state = tiny_convnet().state_dict()
    state["conv2.weight"][0, 0, 0, 0] = bad
    path = save_state_dict(state, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        read_state_dict(path)
    assert "conv2.weight" in str(info.value) and "conv1.weight" not in str(info.value)


def test_non_finite_half_precision(tmp_path: Path) -> None:
    state = {k: v.half() for k, v in tiny_convnet().state_dict().items()}
    state["fc.bias"][1] = float("inf")
    path = tmp_path / "half.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="fc.bias"):
        read_state_dict(path)


def test_no_state_dict_inside(tmp_path: Path) -> None:
    path = tmp_path / "opt.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="no state dict found") as info:
        read_state_dict(path)
    assert "'epoch'" in str(info.value)


def test_sparse_tensor_refused(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(3).to_sparse()}, path)
    with pytest.raises(CheckpointError):
        read_state_dict(path)


# ------------------------------------------------------------------ strict loading report


def test_missing_unexpected_and_shape_mismatch_listed_key_by_key() -> None:
    model = tiny_convnet()
    state = dict(model.state_dict())
    del state["bn1.running_var"]
    state["extra.weight"] = torch.zeros(3)
    state["conv2.weight"] = torch.zeros(8, 4, 5, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_into(model, state)
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 wrong shape" in message
    assert "bn1.running_var (4)" in message
    assert "extra.weight (3)" in message
    assert "conv2.weight: checkpoint (8, 4, 5, 5), model (8, 2, 3, 3)" in message
    _assert_same_state(model.state_dict(), before)  # left unchanged


def test_missing_num_batches_tracked_is_tolerated() -> None:
    src = tiny_convnet(seed=8)
    state = {k: v for k, v in src.state_dict().items() if "num_batches_tracked" not in k}
    dst = tiny_convnet(seed=9)
    load_into(dst, state)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


def test_long_key_lists_are_capped() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    with pytest.raises(CheckpointError) as info:
        load_into(model, {"other.weight": torch.zeros(1)})
    message = str(info.value)
    assert "60 missing" in message and "... and 40 more" in message
    assert "no key in common" in message


def test_wrong_num_classes_hint() -> None:
    ckpt = tiny_convnet(num_classes=100).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_into(tiny_convnet(num_classes=10), ckpt)
    message = str(info.value)
    assert "fc.weight: checkpoint (100, 8), model (10, 8)" in message
    assert "the checkpoint's fc.weight has shape (100, 8), the model expects (10, 8)" in message
    assert "--num-classes 100" in message
    assert "--width" not in message.split("hint:")[1].split("?")[1]


def test_wrong_width_hint() -> None:
    ckpt = tiny_convnet(width=8).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_into(tiny_convnet(width=4), ckpt)
    message = str(info.value)
    assert "--width 8" in message and "--num-classes" not in message.split("try")[-1]


def test_wrong_in_chans_hint() -> None:
    ckpt = tiny_convnet(in_chans=1).state_dict()
    with pytest.raises(CheckpointError, match="--in-chans 1"):
        load_into(tiny_convnet(in_chans=3), ckpt)


# ------------------------------------------------------------------ resource exhaustion


def test_legacy_storage_larger_than_file_is_refused(tmp_path: Path) -> None:
    control = write_legacy_declaring_storage(tmp_path / "ok.pt", 4)
    assert torch.equal(read_state_dict(control)["fc.weight"], torch.zeros(4))
    hostile = write_legacy_declaring_storage(tmp_path / "big.pt", 2**26)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        read_state_dict(hostile)


@pytest.mark.timeout(30)
def test_shared_nested_dicts_do_not_explode(tmp_path: Path) -> None:
    # Every level references ONE dict 300 times; unmemoised, the search visits 300**4 dicts.
    level: dict[str, object] = {"leaf": 1}
    for _ in range(4):
        level = {f"k{i}": level for i in range(300)}
    path = tmp_path / "dag.pt"
    torch.save(level, path)
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="no state dict found"):
        read_state_dict(path)


def test_many_views_of_one_storage_are_bounded(tmp_path: Path) -> None:
    base = torch.zeros(100_000)  # 400 kB stored once
    views = {f"v{i}": base[i:] for i in range(100)}  # ~40 MB of views
    path = tmp_path / "views.pt"
    torch.save(views, path)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError, match="tensors add up to"):
        read_state_dict(path, max_bytes=10_000_000)


def test_tied_weights_count_once_toward_the_bound(tmp_path: Path) -> None:
    w = torch.zeros(1000)
    path = tmp_path / "tied.pt"
    torch.save({"a.weight": w, "b.weight": w}, path)
    assert len(read_state_dict(path, max_bytes=6000)) == 2


def test_absurdly_long_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "long.pt"
    torch.save({"module." * 2000 + "w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="longer than"):
        read_state_dict(path)


def test_widened_weights_only_allowlist_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = write_evil_torch_save(tmp_path / "evil.pt", marker)
    good = tmp_path / "good.pt"
    torch.save(tiny_convnet().state_dict(), good)
    with (
        torch.serialization.safe_globals([MarkerPayload]),
        pytest.raises(RuntimeError, match="allow-listed globals.*MarkerPayload"),
    ):
        read_state_dict(evil)
    assert not marker.exists()
    assert read_state_dict(good)  # the allowlist is back to torch's own entries
