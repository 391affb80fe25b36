"""Rank allocation probe: how much real accuracy each allocation keeps right after
compression, refit and BN recalibration on synthetic images (no fine-tuning), and optionally
after a short distillation.

    .venv/bin/python bench/explore_alloc.py --attack badnet --mode all2one --ratio 3 \\
        --variants keep_ratio/weight energy/response threshold/response --finetune-epochs 5

A variant is ``ALLOCATION/SPECTRUM[/MIN_LAYER_SHARE[/MAC_RATIO[/MAC_ALLOCATION]]]``: an
allocator of :mod:`cnc_core.allocation`, fed the layers' weight spectra ("weight", what ``compress``
uses alone) or their response spectra on the synthetic images ("response",
:func:`cnc_core.purify.refit.activation_spectra`). Width-16 zoo models, Fashion-MNIST (not
CIFAR-10); MAC_RATIO adds ``CompressConfig.mac_ratio`` (a MAC budget beside the parameter
one) and MAC_ALLOCATION how it is met (``tilted``, the default, or ``shared``); the
synthetic images are the ``cnc`` preset's, from the shared cache. Real test
images only score the result. Prints a markdown table and appends JSON lines to
``bench/results/explore-alloc.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from bench.synth_cache import cached_synthetic, model_key  # noqa: E402
from bench.zoo import eval_sets, load_zoo_model  # noqa: E402
from cnc_core.compress import CompressConfig, compress, compressible_layers  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.evaluate import accuracy, attack_success_rate  # noqa: E402
from cnc_core.metrics import count_macs  # noqa: E402
from cnc_core.purify.finetune import agreement, finetune, recalibrate_bn  # noqa: E402
from cnc_core.purify.pipeline import PurifyConfig  # noqa: E402
from cnc_core.purify.refit import activation_spectra, refit_compact  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MS = {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}


def _ranks_summary(decisions: list) -> str:
    """``name:r_out/r_in`` of the factorised layers, compact."""
    parts = []
    for d in decisions:
        if d.kind in ("tucker2", "svd"):
            short = d.name.replace("layer", "L").replace(".conv", "c").replace(".downsample.0", "d")
            parts.append(f"{short}:{d.ranks[0]}/{d.ranks[1]}")
        elif d.kind == "dense":
            parts.append(f"{d.name}:dense")
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack", default="badnet")
    p.add_argument("--mode", default="all2one")
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--variants", nargs="+", default=["keep_ratio/weight", "energy/response"])
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_zoo_model(args.attack, args.mode, 16)
    model.eval()
    preset = PurifyConfig.for_method("cnc")
    images, _ = cached_synthetic(model, preset.synthesis, model_key(args.attack, args.mode), **MS)
    sets = eval_sets(args.attack, args.mode)
    clean = sets["clean"]
    assert clean is not None
    xs, ys = clean[0][: args.eval_n], clean[1][: args.eval_n]
    poisoned = sets["poisoned"]
    base_names = None
    rows = []
    for variant in args.variants:
        parts = variant.split("/")
        allocation, spectrum = parts[0], parts[1]
        share = float(parts[2]) if len(parts) > 2 else 0.0
        mac_ratio = float(parts[3]) if len(parts) > 3 else None
        cfg = CompressConfig(
            ratio=args.ratio,
            allocation=allocation,
            min_layer_share=share,
            mac_ratio=mac_ratio,
            mac_allocation=parts[4] if len(parts) > 4 else "tilted",
        )
        t0 = time.perf_counter()
        spectra = None
        if spectrum == "response":
            if base_names is None:
                base_names = compressible_layers(model, cfg)
            spectra = activation_spectra(model, base_names, images)
        elif spectrum != "weight":
            raise SystemExit(f"spectrum must be weight or response, not {spectrum!r}")
        cres = compress(model, cfg, spectra=spectra, input_shape=(3, 32, 32))
        student = cres.model
        refit_compact(model, cres, images)
        recalibrate_bn(student, images, batch_size=128)
        row = {
            "variant": variant,
            "params": cres.params_after,
            "macs": count_macs(student, (3, 32, 32)),
            "mac_tilt": cres.mac_tilt,
            "acc_refit": accuracy(student, xs, ys, **MS),
            "agree_refit": agreement(student, model, images),
            "ranks": _ranks_summary(cres.decisions),
        }
        if args.finetune_epochs:
            ft = dataclasses.replace(
                preset.finetune,
                epochs=args.finetune_epochs,
                patience=args.finetune_epochs,
                recal_stamped=0.0,
            )
            finetune(student, model, images, None, None, ft)
            row["acc_ft"] = accuracy(student, xs, ys, **MS)
            if poisoned is not None:
                n = args.eval_n
                row["asr_ft"] = attack_success_rate(student, poisoned[0][:n], poisoned[1][:n], **MS)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    header = "| variant | params | MACs | ACC refit | agree refit |"
    rule = "|---|---|---|---|---|"
    if args.finetune_epochs:
        header += f" ACC +{args.finetune_epochs} ep KD |"
        rule += "---|"
    print(f"\n{args.attack} {args.mode} {args.ratio:g}x, first {args.eval_n} test images\n")
    print(header)
    print(rule)
    for r in rows:
        line = (
            f"| {r['variant']} | {r['params']:,} | {r['macs'] / 1e6:.1f}M | {r['acc_refit']:.2f} "
            f"| {r['agree_refit']:.3f} |"
        )
        if args.finetune_epochs:
            line += f" {r['acc_ft']:.2f} |"
        print(line)
    for r in rows:
        print(f"\n{r['variant']}: {r['ranks']}")
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "explore-alloc.jsonl").open("a") as fh:
        for r in rows:
            record = {"attack": args.attack, "mode": args.mode, "ratio": args.ratio}
            record.update(r)
            record.update({"tag": args.tag, "machine": machine()["processor"]})
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
