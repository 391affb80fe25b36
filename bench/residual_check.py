"""Measure data-free residual-backdoor signals on purified students saved by
``bench/explore_purify.py --save DIR``: Neural Cleanse re-run on the student, beside the
original's, and the real ASR from the explore log. Prints one row per student.

    .venv/bin/python bench/residual_check.py --width 16 --tag s29-save-w16 \\
        --students bench/.cache/students
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.explore_purify import LOG, _inversion  # noqa: E402
from bench.synth_cache import cached_synthetic, model_key, synth_key  # noqa: E402
from bench.zoo import load_zoo_model  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.export import load_compact  # noqa: E402
from cnc_core.purify.pipeline import PurifyConfig  # noqa: E402
from cnc_core.purify.proxies import trigger_inversion  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--tag", required=True)
    p.add_argument("--students", default="bench/.cache/students")
    p.add_argument("--suffix", default="", help="after the student folder's name")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {}
    for line in LOG.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("tag") == args.tag:
            attack, mode = rec["attack"].split("-")[:2]
            runs[(attack, mode)] = rec
    cfg = PurifyConfig.for_method("cnc")
    for (attack, mode), rec in sorted(runs.items()):
        d = Path(args.students) / f"w{args.width}-{attack}-{mode}-3x{args.suffix}"
        if not d.exists():
            continue
        model, _ = load_zoo_model(attack, mode, args.width)
        key = model_key(attack, mode, args.width)
        synth, _ = cached_synthetic(
            model, cfg.synthesis, key, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
        )
        orig = _inversion(model, synth, cfg, key, synth_key(cfg.synthesis))
        student = load_compact(d)
        gen = torch.Generator().manual_seed(args.seed)
        inv = trigger_inversion(
            student, synth, cfg.proxy.inversion, mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD, generator=gen,
        )
        t = rec.get("suspected_target", orig.suspected_target)
        row = {
            "model": f"{attack}-{mode}",
            "acc": rec.get("acc"), "asr": rec.get("asr"),
            "target": t,
            "orig_nc": [orig.suspected_target, round(orig.anomaly_index, 2)],
            "stud_nc": [inv.suspected_target, round(inv.anomaly_index, 2)],
            "stud_ai_t": round(inv.anomaly_indices[t], 2),
            "growth_t": round(inv.mask_norms[t] / orig.mask_norms[t], 2),
            "orig_norms": [round(v, 1) for v in orig.mask_norms],
            "stud_norms": [round(v, 1) for v in inv.mask_norms],
            "stud_success": [round(v, 2) for v in inv.success],
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
