"""Research: how well do data-free proxies stand in for the real trigger? (CPU-sized)

For one zoo model: synthesise images (cached, shared with ``explore_purify.py``), run trigger
inversion / PGD / universal perturbation on them, and report the detection signal (suspected
target, anomaly index, histograms) plus diagnostics that use real test images for
EVALUATION only: how often the inverted trigger flips real test images to the target, and
where the mask's mass lies. Appends a JSON line to ``bench/results/explore-log.jsonl``.

Example::

    .venv/bin/python bench/explore_detect.py --attack badnet --num-images 512 --iterations 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.explore_purify import LOG  # noqa: E402
from bench.synth_cache import cached_synthetic, model_key, synth_key  # noqa: E402
from bench.zoo import eval_sets, load_zoo_model  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, normalize  # noqa: E402
from cnc_core.purify.proxies import (  # noqa: E402
    PGDConfig,
    ProxyConfig,
    TriggerInversionConfig,
    UniversalConfig,
    apply_trigger,
    make_proxies,
    predict,
)
from cnc_core.purify.synthesis import SynthesisConfig  # noqa: E402

MS = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", default="badnet")
    p.add_argument("--mode", default="all2one")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--class-weight", type=float, default=0.0)
    p.add_argument("--statistics", default="batch")
    p.add_argument("--inv-steps", type=int, default=100)
    p.add_argument("--inv-l1", type=float, default=0.01)
    p.add_argument("--inv-ipc", type=int, default=24)
    p.add_argument("--kinds", default="trigger_inversion,pgd,universal")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, _ = load_zoo_model(args.attack, args.mode, 16)
    key = model_key(args.attack, args.mode)
    s = SynthesisConfig(
        num_images=args.num_images,
        batch_size=128,
        iterations=args.iterations,
        class_weight=args.class_weight,
        statistics=args.statistics,
        seed=args.seed,
    )
    synth, made = cached_synthetic(model, s, key, **MS)
    t_synth = made["seconds"] or 0.0
    sets = eval_sets(args.attack, args.mode)
    xc, yc = sets["clean"][0][:1000], sets["clean"][1][:1000]  # type: ignore[index]
    pred_synth = predict(model, synth)
    out: dict = {
        "kind": "detect",
        "attack": key,
        "synth": synth_key(s),
        "synth_s": round(t_synth, 1),
        "synth_class_hist": torch.bincount(pred_synth, minlength=10).tolist(),
    }
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        cfg = ProxyConfig(
            kind=kind,
            pgd=PGDConfig(eps=8 / 255, steps=10),
            universal=UniversalConfig(eps=0.1, steps=100),
            inversion=TriggerInversionConfig(
                steps=args.inv_steps, l1_weight=args.inv_l1, images_per_class=args.inv_ipc
            ),
            seed=args.seed,
        )
        ps = make_proxies(model, synth, cfg, **MS)
        rec = {
            "suspected": ps.suspected_target,
            "share": round(ps.share, 3),
            "flip_rate": round(ps.flip_rate, 3),
            "hist": ps.histogram,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if ps.inversion is not None:
            inv = ps.inversion
            t = inv.suspected_target
            mask = inv.masks[inv.classes.index(t)]
            rec["mask_norms"] = [round(v, 1) for v in inv.mask_norms]
            rec["anomaly_index"] = round(inv.anomaly_index, 2)
            rec["success"] = [round(v, 2) for v in inv.success]
            rec["mask_mass_bottom_right_4x4"] = round(
                float(mask[:, -4:, -4:].sum() / mask.sum()), 3
            )
            # evaluation only: the inverted trigger on real test images
            stamped = apply_trigger(
                normalize(xc, *MS.values()), mask, inv.patterns[inv.classes.index(t)], **MS
            )
            keep = yc != t
            rec["real_flip_to_target"] = round(
                float((predict(model, stamped[keep]) == t).float().mean()), 3
            )
        out[kind] = rec
    print(json.dumps(out))
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as fh:
        fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
