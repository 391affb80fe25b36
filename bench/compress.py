"""Compression benchmark: params, MACs and latency of ResNet-18 before and after C&C
compression at 2x / 3x / 4x, measured side by side in one run.

    .venv/bin/python bench/compress.py                 # widths 16 and 64, CPU
    .venv/bin/python bench/compress.py --device cuda   # on a GPU

Writes ``bench/results/compress-<device>.md`` and ``.json``. Compression only (no
purification); weights are random (seeded): latency and size do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved_latency, interleaved_onnx_latency, machine  # noqa: E402
from cnc_core.compress import CompressConfig, compress  # noqa: E402
from cnc_core.metrics import count_macs, count_params  # noqa: E402
from cnc_core.models import create_model  # noqa: E402
from cnc_core.onnx_export import export_onnx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(
    widths: list[int],
    ratios: list[float],
    batches: list[int],
    device: torch.device,
    repeats: int,
    allocation: str,
    shares: list[float],
    multiples: tuple[int, ...] | list[int] = (1,),
    onnx: bool = True,
    channels_last: bool = False,
) -> dict:
    rows = []
    shape = (3, 32, 32)
    for width in widths:
        torch.manual_seed(0)
        original = create_model("resnet18", num_classes=10, width=width).eval()
        variants = [(r, s, k) for r in ratios for s in shares for k in multiples]
        compact = {}
        for ratio, share, multiple in variants:
            t0 = time.perf_counter()
            config = CompressConfig(
                ratio=ratio, allocation=allocation, min_layer_share=share, rank_multiple=multiple
            )
            result = compress(original, config)
            compact[(ratio, share, multiple)] = (result.model.eval(), time.perf_counter() - t0)
        models = [original] + [compact[v][0] for v in variants]
        latencies = {
            b: interleaved_latency(
                models,
                shape,
                batch_size=b,
                device=device,
                repeats=repeats,
                channels_last=channels_last,
            )
            for b in batches
        }
        onnx_latencies: dict[int, list[float]] = {}
        if onnx:
            with tempfile.TemporaryDirectory() as tmp:
                paths = [
                    str(export_onnx(m.cpu(), Path(tmp) / f"m{i}.onnx", shape))
                    for i, m in enumerate(models)
                ]
                onnx_latencies = {
                    b: interleaved_onnx_latency(paths, shape, batch_size=b, repeats=repeats)
                    for b in batches
                }
        p0, m0 = count_params(original), count_macs(original, shape)
        for i, (ratio, share, multiple) in enumerate([(1.0, 0.0, 1)] + variants):
            model = models[i]
            params, macs = count_params(model), count_macs(model, shape)
            row = {
                "width": width,
                "target_ratio": ratio,
                "min_layer_share": share,
                "rank_multiple": multiple,
                "params": params,
                "param_ratio": p0 / params,
                "macs": macs,
                "mac_ratio": m0 / macs,
                "compress_s": compact[(ratio, share, multiple)][1] if i else 0.0,
            }
            for b in batches:
                row[f"latency_b{b}_ms"] = latencies[b][i]
                row[f"speedup_b{b}"] = latencies[b][0] / latencies[b][i]
                if onnx_latencies:
                    row[f"ort_b{b}_ms"] = onnx_latencies[b][i]
                    row[f"ort_speedup_b{b}"] = onnx_latencies[b][0] / onnx_latencies[b][i]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {
        "machine": machine(),
        "device": str(device),
        "allocation": allocation,
        "repeats": repeats,
        "channels_last": channels_last,
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }


def to_markdown(data: dict, batches: list[int]) -> str:
    m = data["machine"]
    onnx = "ort_b1_ms" in data["rows"][0] or f"ort_b{batches[0]}_ms" in data["rows"][0]
    lines = [
        "# Compression benchmark: ResNet-18 (CIFAR stem, 10 classes, 32x32 input)",
        "",
        f"Machine: {m.get('cuda_device') or m['processor']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']} ({m['torch_threads']} threads); device {data['device']}; "
        f"allocation `{data['allocation']}`; median of {data['repeats']} interleaved runs; "
        f"load average at start {data.get('load_average', ['?'])[0]}.",
        (
            "torch: eager PyTorch in channels_last (NHWC) memory format; "
            if data.get("channels_last")
            else "torch: eager PyTorch on the device; "
        )
        + "ORT: the exported ONNX model in ONNX Runtime "
        "(CPU, 2 intra-op threads).",
        "Command: `"
        + data.get(
            "command",
            ".venv/bin/python bench/compress.py"
            + (" --device cuda" if data["device"].startswith("cuda") else "")
            + (" --channels-last" if data.get("channels_last") else ""),
        )
        + "`",
        "",
        "| width | target | min_layer_share | rank multiple | params | param ratio | MACs | "
        "MAC ratio | "
        + " | ".join(f"torch b{b} ms (speed-up)" for b in batches)
        + (" | " + " | ".join(f"ORT b{b} ms (speed-up)" for b in batches) if onnx else "")
        + f" | torch speed-up / MAC ratio (b{batches[-1]})"
        + (f" | ORT speed-up / MAC ratio (b{batches[-1]})" if onnx else "")
        + " |",
        "|---|---|---|---|---|---|---|---|"
        + "---|" * len(batches) * (2 if onnx else 1)
        + ("---|---|" if onnx else "---|"),
    ]
    for r in data["rows"]:
        cells = [
            str(r["width"]),
            "original" if r["target_ratio"] == 1.0 else f"{r['target_ratio']:g}x",
            "-" if r["target_ratio"] == 1.0 else f"{r['min_layer_share']:g}",
            "-" if r["target_ratio"] == 1.0 else str(r.get("rank_multiple", 1)),
            f"{r['params']:,}",
            f"{r['param_ratio']:.2f}x",
            f"{r['macs'] / 1e6:,.1f}M",
            f"{r['mac_ratio']:.2f}x",
        ]
        for b in batches:
            cells.append(f"{r[f'latency_b{b}_ms']:.2f} ({r[f'speedup_b{b}']:.2f}x)")
        if onnx:
            for b in batches:
                cells.append(f"{r[f'ort_b{b}_ms']:.2f} ({r[f'ort_speedup_b{b}']:.2f}x)")
        last = batches[-1]
        cells.append(f"{r[f'speedup_b{last}'] / r['mac_ratio']:.2f}")
        if onnx:
            cells.append(f"{r[f'ort_speedup_b{last}'] / r['mac_ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--allocation", default="keep_ratio")
    parser.add_argument(
        "--shares",
        type=float,
        nargs="+",
        default=[0.0, 0.05],
        help="min_layer_share values to compare side by side",
    )
    parser.add_argument(
        "--rank-multiples",
        type=int,
        nargs="+",
        default=[1],
        help="rank_multiple values to compare side by side",
    )
    parser.add_argument("--tag", default="", help="suffix for the results file names")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime timings")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="time eager torch in NHWC memory format (both models)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    data = run(
        args.widths,
        args.ratios,
        args.batches,
        device,
        args.repeats,
        args.allocation,
        args.shares,
        args.rank_multiples,
        onnx=not args.no_onnx,
        channels_last=args.channels_last,
    )
    data["command"] = ".venv/bin/python bench/compress.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"compress-{device.type}{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{stem}.md").write_text(to_markdown(data, args.batches))
    print(to_markdown(data, args.batches))


if __name__ == "__main__":
    main()
