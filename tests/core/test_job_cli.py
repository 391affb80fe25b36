"""A whole job through the library seam and the CLI: artifacts, reload, ONNX, errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from cnc_core.cli import EXIT_BAD_INPUT, main
from cnc_core.export import load_compact, read_manifest
from cnc_core.job import JobConfig, run_job
from cnc_core.models import create_model
from cnc_core.progress import Cancelled

FAST = {"latency_repeats": 2, "latency_batches": [1, 4]}


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=4)
    path = tmp_path / "r18.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _config(**kw: object) -> JobConfig:
    base: dict[str, object] = dict(
        arch="resnet18",
        num_classes=10,
        width=4,
        method="compress",
        ratio=2.0,
        mean=(0.5,),
        std=(0.25,),
        advanced=dict(FAST),
    )
    base.update(kw)
    return JobConfig(**base)  # type: ignore[arg-type]


def test_run_job_writes_loadable_artifacts_and_a_report(checkpoint: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    result = run_job(
        checkpoint, tmp_path / "out", _config(), progress=lambda s, f: seen.append((s, f))
    )
    names = set(result.artifacts)
    assert {
        "model.safetensors",
        "manifest.json",
        "model.onnx",
        "report.json",
        "report.md",
        "plots/spectra.png",
        "plots/summary.png",
    } <= names
    for path in result.artifacts.values():
        assert path.is_file() and path.stat().st_size > 0
    assert result.artifacts["plots/summary.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads(result.artifacts["report.json"].read_text())
    assert report["compression"]["achieved_ratio"] >= 2.0
    assert report["metrics"]["ratios"]["param ratio"] >= 2.0
    assert report["onnx"]["passed"] is True
    assert set(report["timings_s"]) == {"load", "compress", "export", "measure", "plots"}
    assert [f for _, f in seen] == sorted(f for _, f in seen)

    # the compact model reloads without pickles and matches the ONNX twin
    compact = load_compact(tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["model"]["mean"] == [0.5] and manifest["input_shape"] == [3, 32, 32]
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(result.artifacts["model.onnx"]))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(onnx_out), compact(x), atol=1e-4)


def test_tampered_weights_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    run_job(checkpoint, tmp_path / "out", _config(export_onnx=False))
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_compact(tmp_path / "out")


def test_cancellation_from_the_progress_callback_stops_the_job(
    checkpoint: Path, tmp_path: Path
) -> None:
    calls = []

    def cancel(stage: str, fraction: float) -> None:
        calls.append(stage)
        if stage.startswith("compress/"):
            raise Cancelled

    with pytest.raises(Cancelled):
        run_job(checkpoint, tmp_path / "out", _config(), progress=cancel)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "resnet34"}, "missing"),
        ({"num_classes": 7}, "num_classes|shape"),
        ({"ratio": 0.5}, "ratio must be"),
        ({"ratio": 1000.0}, "cannot reach"),
        ({"method": "magic"}, "method must be"),
        ({"advanced": {"bogus": 1}}, "unknown advanced"),
        ({"advanced": {"num_images": 10**9}}, r"num_images=1000000000 must be .* \[1, 32768\]"),
        ({"advanced": {"rank_multiple": 0}}, "rank_multiple=0 must be an integer"),
        (
            {"method": "cnc", "input_size": 1024},
            r"1024 x 3 x 1024\^2 = 3,221,225,472 values exceeds",
        ),
        ({"method": "cnc", "advanced": {"num_images": 32768}, "input_size": 128}, "image budget"),
    ],
)
def test_bad_jobs_fail_with_a_named_reason(
    checkpoint: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_job(checkpoint, tmp_path / "out", _config(**change))


def test_cli_compress_and_inspect(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "compress",
            str(checkpoint),
            "--arch",
            "resnet18",
            "--width",
            "4",
            "--num-classes",
            "10",
            "--ratio",
            "3",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "latency_repeats=2",
            "--set",
            "latency_batches=[1]",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and (out / "model.onnx").is_file()
    assert (
        main(
            [
                "inspect",
                str(checkpoint),
                "--arch",
                "resnet18",
                "--width",
                "4",
                "--num-classes",
                "10",
                "--ratio",
                "3",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "layer4.1.conv2" in table and "tucker2" in table


def test_cli_bad_inputs_exit_3_with_a_reason(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("hello, not a model")
    code = main(
        [
            "compress",
            str(junk),
            "--arch",
            "resnet18",
            "--num-classes",
            "10",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == EXIT_BAD_INPUT
    assert "not a checkpoint" in capsys.readouterr().err
    code = main(
        [
            "compress",
            str(checkpoint),
            "--arch",
            "nonet",
            "--num-classes",
            "10",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == EXIT_BAD_INPUT and "nonet" in capsys.readouterr().err


def test_package_exports_the_public_api() -> None:
    import cnc_core

    for name in cnc_core.__all__:
        assert getattr(cnc_core, name) is not None
    with pytest.raises(AttributeError):
        cnc_core.not_a_thing  # noqa: B018


def test_cli_purify_evaluates_on_user_data_and_writes_a_readable_report(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    clean, poisoned = tmp_path / "clean.npz", tmp_path / "poisoned.npz"
    np.savez(
        clean,
        images=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, 16),
    )
    np.savez(
        poisoned,
        images=rng.random((8, 3, 32, 32), dtype=np.float32),
        labels=np.zeros(8, dtype=np.int64),
    )
    args = [
        "purify",
        str(checkpoint),
        *shlex.split(
            "--arch resnet18 --width 4 --num-classes 10 --mean 0.5 --std 0.25 --ratio 2 "
            "--quiet --no-onnx --set latency_repeats=1 --set latency_batches=[1] "
            "--set num_images=32 --set synthesis_iterations=2 --set epochs=1 "
            "--set inversion_steps=2 --set detect=false"
        ),
    ]
    out = tmp_path / "p"
    code = main(
        [*args, "--out", str(out), "--eval-clean", str(clean), "--eval-poisoned", str(poisoned)]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "suspected backdoor target class" in printed and "ACC purified" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["evaluation"]) == {
        "ACC original",
        "ACC purified",
        "ASR original",
        "ASR purified",
    }
    assert {"synthesis", "proxies", "finetune"} <= set(report["purify_timings_s"])
    page = (out / "report.md").read_text()
    assert f"Suspected backdoor target: class {report['suspected_target']}" in page
    assert "## Evaluation on your data" in page and "purify / finetune" in page

    # a wrong evaluation set is refused before any purification runs
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 1, 28, 28), dtype=np.float32), labels=np.zeros(4, int))
    code = main([*args, "--out", str(tmp_path / "q"), "--eval-clean", str(bad)])
    assert code == EXIT_BAD_INPUT
    assert "(1, 28, 28)" in capsys.readouterr().err and not (tmp_path / "q").exists()
    np.savez(bad, images=np.zeros((4, 3, 32, 32), dtype=np.float32), labels=np.full(4, 12))
    assert main([*args, "--out", str(tmp_path / "q"), "--eval-clean", str(bad)]) == EXIT_BAD_INPUT
    assert "out of range" in capsys.readouterr().err


def test_a_method_brings_its_compression_defaults_under_the_callers_settings() -> None:
    from cnc_core.job import split_advanced

    base = dict(arch="resnet18", num_classes=10)
    cc, _, _ = split_advanced(JobConfig(**base, method="cnc"))
    assert (cc.allocation, cc.min_layer_share, cc.ratio) == ("threshold", 0.1, 3.0)
    cc, _, _ = split_advanced(
        JobConfig(**base, method="cnc", advanced={"allocation": "keep_ratio"})
    )
    assert (cc.allocation, cc.min_layer_share) == ("keep_ratio", 0.1)
    for method in ("compress", "cnc-paper", "clp"):
        cc, _, _ = split_advanced(JobConfig(**base, method=method))
        assert (cc.allocation, cc.min_layer_share) == ("keep_ratio", 0.0)
