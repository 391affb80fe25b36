"""Wall time of one purification, stage by stage (the issue's 5-minute budget on 2 cores).

    .venv/bin/python bench/purify_time.py                      # BadNet all-to-one, 3x, preset
    .venv/bin/python bench/purify_time.py --set num_images=512 --tag=-n512
    .venv/bin/python bench/purify_time.py --compare channels_last=false --tag=-layout

Runs ``purify`` once on a zoo model (width-16 ResNet-18, Fashion-MNIST, not CIFAR-10) from
scratch: synthesis included, no cache, the ``cnc`` preset unless ``--set`` changes it. Run it
on an otherwise idle machine: the figure is the machine's, and is named with it. Also scores
the result on the first ``--eval-n`` test images so a faster setting shows what it costs.
Writes ``bench/results/purify-time{tag}.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backdoor import purify_config  # noqa: E402
from bench.common import machine, reference_gflops  # noqa: E402
from bench.zoo import eval_sets, load_zoo_model  # noqa: E402
from cnc_core.cli import parse_knob  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.evaluate import accuracy, attack_success_rate  # noqa: E402
from cnc_core.purify.pipeline import purify  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _run(attack: str, mode: str, ratio: float, knobs: dict[str, Any], n: int) -> dict[str, Any]:
    """One purification from scratch, timed, and its ACC / ASR on the first ``n`` test images."""
    cfg = purify_config("cnc", ratio, 0, knobs)
    model, _ = load_zoo_model(attack, mode, 16)
    speed_before = reference_gflops()
    t0 = time.perf_counter()
    result = purify(
        model, cfg, input_shape=(3, 32, 32), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
    )
    total = time.perf_counter() - t0
    speed_after = reference_gflops()
    sets = eval_sets(attack, mode)
    clean, poisoned = sets["clean"], sets["poisoned"]
    assert clean is not None and poisoned is not None
    return {
        "knobs": knobs,
        "seconds": total,
        "stages": result.timings,
        "acc": accuracy(
            result.model, clean[0][:n], clean[1][:n], mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
        ),
        "asr": attack_success_rate(
            result.model,
            poisoned[0][:n],
            poisoned[1][:n],
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
        ),
        "reference_gflops": {"before": speed_before, "after": speed_after},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", default="badnet-all2one")
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time a second purification with these knobs on top (run right after the "
        "first, same process), and print the ratio",
    )
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    attack, mode = args.attack.split("-", 1)
    knobs = dict(parse_knob(item) for item in args.set)
    n = args.eval_n
    runs = [_run(attack, mode, args.ratio, knobs, n)]
    if args.compare:
        variant = {**knobs, **dict(parse_knob(item) for item in args.compare)}
        runs.append(_run(attack, mode, args.ratio, variant, n))
    data = {
        "machine": machine(),
        "command": "python bench/purify_time.py " + " ".join(sys.argv[1:]),
        "attack": args.attack,
        "ratio": args.ratio,
        "eval_n": n,
        **runs[0],
        "runs": runs,
    }
    m = data["machine"]
    lines = [
        "# Purification wall time (width-16 ResNet-18, Fashion-MNIST, not CIFAR-10)",
        "",
        f"Machine: {m['processor']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch "
        f"threads), torch {m['torch']}. Command: `{data['command']}`.",
        "Machine speed (fp32 512x512 matrix product, GFLOP/s) before and after each run is "
        "given with it; compare it across runs before comparing their times.",
        "",
    ]
    for run in runs:
        speed = run["reference_gflops"]
        lines.append(
            f"- {args.attack} at {args.ratio:g}x, knobs {run['knobs'] or 'none (the cnc preset)'}"
            f": **{run['seconds']:.0f} s** in all; ACC / ASR {run['acc']:.2f} / "
            f"{run['asr']:.2f} on the first {n:,} test images; machine speed "
            f"{speed['before']:.0f} / {speed['after']:.0f} GFLOP/s."
        )
    header = " | ".join(f"run {i + 1} (s)" for i in range(len(runs)))
    ratio_col = len(runs) > 1
    lines += [
        "",
        f"| stage | {header} |" + (" run 1 / run 2 |" if ratio_col else ""),
        "|---|" + "---|" * (len(runs) + int(ratio_col)),
    ]
    for stage in list(runs[0]["stages"]) + ["total"]:
        vals = [r["seconds"] if stage == "total" else r["stages"].get(stage, 0.0) for r in runs]
        row = f"| {stage} | " + " | ".join(f"{v:.1f}" for v in vals) + " |"
        if ratio_col:
            row += f" {vals[0] / vals[1]:.2f}x |" if vals[1] > 0.05 else " - |"
        lines.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"purify-time{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
