"""How much of the synthetic images does each zoo model give each class, before any defence?

A lead from explore-purify.md 4ae: refitting a class's classifier row to the original
model's logits helps a clean model's natural class and brings back a real target's
backdoor (InputAware all-to-one), and no signal measured there told the two apart. This
prints, for every zoo model, the original's mean softmax share and argmax share of each
class on the ``cnc`` preset's synthetic images (``--seed``, cached as ``bench/backdoor.py``
caches them; made here where missing), beside the class Neural Cleanse names in the table
run (``--table``). Appends one JSON line per model to ``bench/results/original-shares.jsonl``.
Data-free: no real image is read. Example::

    PYTHONPATH=. .venv/bin/python bench/original_shares.py --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.synth_cache import cached_synthetic, model_key  # noqa: E402
from bench.zoo import ZOO, load_zoo_model  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.purify.calibrate import logits_of, mean_softmax  # noqa: E402
from cnc_core.purify.pipeline import PurifyConfig, shared_targets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "original-shares.jsonl"


def named_classes(table: Path) -> dict[str, tuple[int, float]]:
    """Neural Cleanse's class and anomaly index per model in a ``bench/backdoor.py`` JSON."""
    named: dict[str, tuple[int, float]] = {}
    for result in json.loads(table.read_text())["results"]:
        row = result["rows"].get("cnc 3x", {})
        inv = row.get("detection", {}).get("trigger_inversion")
        if inv:
            key = f"{result['attack']}-{result['mode']}"
            named[key] = (int(inv["suspected_target"]), float(inv["anomaly_index"]))
    return named


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", type=Path, default=RESULTS / "backdoor-w16-s24.json")
    p.add_argument("--seed", type=int, default=0, help="the synthetic images' seed")
    p.add_argument("--models", nargs="+", help="e.g. wanet-all2one clean-none (default: all)")
    p.add_argument(
        "--width",
        type=int,
        default=16,
        help="the zoo's width (another width: a zoo the preset's bar was not fitted on)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PurifyConfig.for_method("cnc", seed=args.seed)
    synthesis = preset.synthesis
    synth_cfg = dataclasses.replace(synthesis, image_shape=(3, 32, 32))
    named = named_classes(args.table)
    for attack, mode in ZOO:
        if args.models and f"{attack}-{mode}" not in args.models:
            continue
        model, meta = load_zoo_model(attack, mode, args.width)
        key = model_key(attack, mode, args.width)
        images, made = cached_synthetic(
            model, synth_cfg, key, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
        )
        logits = logits_of(model, images)
        soft = mean_softmax(logits)
        hard = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).float()
        hard = hard / logits.shape[0]
        cls, anomaly = (
            named.get(f"{attack}-{mode}", (None, None)) if args.width == 16 else (None, None)
        )
        out: dict[str, Any] = {
            "model": key,
            "seed": args.seed,
            "width": args.width,
            "train_seed": (meta.get("train") or {}).get("seed"),
            "clean_acc": meta.get("clean_acc"),
            "asr": meta.get("asr"),
            # the classes the preset's bar (PurifyConfig.prior_name_share) names
            "named_by_share": shared_targets(soft, preset.prior_name_share),
            "named": cls,
            "anomaly_index": anomaly,
            "softmax_share": [round(v, 4) for v in soft.tolist()],
            "argmax_share": [round(v, 4) for v in hard.tolist()],
            "synthesis_cached": made["cached"],
        }
        with OUT.open("a") as fh:
            fh.write(json.dumps(out) + "\n")
        print(
            f"{key:>28} named {cls} ({anomaly}), by share {out['named_by_share']}  "
            f"softmax {out['softmax_share']}"
        )
        print(f"{'':>28} {'':>12}  argmax  {out['argmax_share']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
