"""Probe: per-class warp inversion (``cnc_core.purify.warp``) on a zoo model's synthetic images.

Uses the ``cnc`` preset's synthetic images (cached by ``bench/synth_cache.py``), inverts one
bounded smooth warp per class, prints each class's reach and the outlier score, and (for
evaluation only) what the suspected class's warp does to real Fashion-MNIST test images.
Appends one JSON line to ``bench/results/explore-log.jsonl``.

Example::

    .venv/bin/python bench/explore_warp.py --attack wanet --mode all2one --threads 1
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
from cnc_core.purify.pipeline import PurifyConfig  # noqa: E402
from cnc_core.purify.proxies import predict  # noqa: E402
from cnc_core.purify.synthesis import cpu_channels_last  # noqa: E402
from cnc_core.purify.warp import WarpInversionConfig, apply_warp, warp_inversion  # noqa: E402

MS = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", default="wanet")
    p.add_argument("--mode", default="all2one")
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--max-shift", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_zoo_model(args.attack, args.mode, 16)
    key = model_key(args.attack, args.mode)
    synth_cfg = PurifyConfig.for_method("cnc").synthesis
    synth, _ = cached_synthetic(model, synth_cfg, key, **MS)
    synth = cpu_channels_last(synth)
    cfg = WarpInversionConfig(
        grid=args.grid,
        max_shift=args.max_shift,
        steps=args.steps,
        images=args.images,
    )
    t0 = time.perf_counter()
    found = warp_inversion(
        model, synth, cfg, generator=torch.Generator().manual_seed(args.seed), **MS
    )
    seconds = time.perf_counter() - t0
    # evaluation only: the suspected class's warp on real test images not of that class
    xc, yc = eval_sets(args.attack, args.mode)["clean"]  # type: ignore[misc]
    xc, yc = xc[:2000], yc[:2000]
    x = normalize(xc, *MS.values())
    t = found.suspected
    keep = yc != t
    real = predict(model, apply_warp(x[keep], found.fields[t], **MS)) == t
    out = {
        "kind": "warp-inversion",
        "tag": args.tag,
        "attack": key,
        "synth": synth_key(synth_cfg),
        "config": cfg.__dict__,
        "success": [round(v, 4) for v in found.success],
        "suspected": t,
        "anomaly_index": round(found.anomaly_index, 2),
        "real_reach": round(float(real.float().mean()), 4),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(out))
    with LOG.open("a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
