"""Research: does permutation trigger inversion find an all-to-all trigger? (CPU-sized)

For one zoo model: synthesise images (cached, shared with ``explore_purify.py``), run
:func:`cnc_core.purify.permutation.permutation_inversion` on them, and report what it found on
the synthetic images (flip rate, mutual information, top share, class mapping) plus, for
EVALUATION only, what the inverted trigger does to real test images: the share sent to
``(y + 1) mod 10`` (the all-to-all attacks' mapping), the share flipped at all, and for BadNet
the mask's mass in the real trigger's bottom-right 4x4 corner. Appends a JSON line to
``bench/results/explore-log.jsonl``. Run it on the clean model too: its figures are the floor.

    .venv/bin/python bench/explore_a2a.py --attack badnet --mode all2all
    .venv/bin/python bench/explore_a2a.py --attack clean --mode none

``--dynamic`` inverts a trigger generator instead (:mod:`cnc_core.purify.dynamic`, the
input-aware all-to-all proxy); the session-11 probes: ``--dynamic --l1 0.001`` (spread 4).
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
from cnc_core.purify.dynamic import (  # noqa: E402
    DynamicInversionConfig,
    DynamicInversionResult,
    dynamic_inversion,
    stamp_dynamic,
)
from cnc_core.purify.permutation import (  # noqa: E402
    PermutationInversionConfig,
    PermutationInversionResult,
    mask_peak_share,
    permutation_inversion,
)
from cnc_core.purify.proxies import apply_trigger, predict  # noqa: E402
from cnc_core.purify.synthesis import SynthesisConfig, cpu_channels_last  # noqa: E402

MS = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", default="badnet")
    p.add_argument("--mode", default="all2all")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument(
        "--batch-size", type=int, default=128, help="synthesis batch (the cnc preset: 256)"
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--l1", type=float, default=0.01)
    p.add_argument("--mi-weight", type=float, default=1.0)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--information", default="full", help="one-pattern search: full or away")
    p.add_argument(
        "--blend-restarts", type=int, default=0, help="one-pattern search: whole-image blends"
    )
    p.add_argument("--blend-alpha", type=float, default=0.2)
    p.add_argument("--ipc", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--search-seed",
        type=int,
        default=None,
        help="seed of the search's own generator (default: --seed; purify uses seed + 900)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="invert a trigger generator (cnc_core.purify.dynamic) instead of one pattern",
    )
    p.add_argument("--spread-weight", type=float, default=4.0, help="dynamic: H(y') weight")
    p.add_argument("--lr", type=float, default=None, help="optimiser lr (default: the config's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_zoo_model(args.attack, args.mode, 16)
    key = model_key(args.attack, args.mode)
    s = SynthesisConfig(
        num_images=args.num_images,
        batch_size=args.batch_size,
        iterations=args.iterations,
        seed=args.seed,
    )
    synth, _ = cached_synthetic(model, s, key, **MS)
    synth = cpu_channels_last(synth)  # as purify lays them out (float rounding differs)
    search_seed = args.seed if args.search_seed is None else args.search_seed
    gen = torch.Generator().manual_seed(search_seed)
    common = dict(
        steps=args.steps, l1_weight=args.l1, mi_weight=args.mi_weight, images_per_class=args.ipc
    )
    if args.lr is not None:
        common["lr"] = args.lr
    cfg: PermutationInversionConfig | DynamicInversionConfig
    t0 = time.perf_counter()
    if args.dynamic:
        cfg = DynamicInversionConfig(**common, spread_weight=args.spread_weight)
        dyn = dynamic_inversion(model, synth, cfg, generator=gen, **MS)
        found: PermutationInversionResult | DynamicInversionResult = dyn
    else:
        cfg = PermutationInversionConfig(
            **common,
            restarts=args.restarts,
            information=args.information,
            blend_restarts=args.blend_restarts,
            blend_alpha=args.blend_alpha,
        )
        inv = permutation_inversion(model, synth, cfg, generator=gen, **MS)
        found = inv
    seconds = time.perf_counter() - t0
    # evaluation only: the inverted trigger on real test images
    xc, yc = eval_sets(args.attack, args.mode)["clean"]  # type: ignore[misc]
    xc, yc = xc[:2000], yc[:2000]
    x = normalize(xc, *MS.values())
    before = predict(model, x)
    corner = 0.0  # the share of the mask in BadNet's real 4x4 corner (one-pattern only)
    if args.dynamic:
        with torch.no_grad():
            after = predict(model, stamp_dynamic(x, dyn.generator, **MS))
    else:
        after = predict(model, apply_trigger(x, inv.mask, inv.pattern, **MS))
        corner = float(inv.mask[:, -4:, -4:].sum() / inv.mask.sum().clamp_min(1e-12))
    ok = before == yc
    out = {
        "kind": "dynamic-inversion" if args.dynamic else "permutation-inversion",
        "attack": key,
        "synth": synth_key(s),
        "config": cfg.__dict__,
        "search_seed": search_seed,
        "seconds": round(seconds, 1),
        "mask_norm": round(found.mask_norm, 1),
        "synthetic": {
            "flip_rate": round(found.flip_rate, 3),
            "mutual_information": round(found.mutual_information, 3),
            "top_share": round(found.top_share, 3),
            "mapping": found.mapping,
        },
        "real": {
            "to_y_plus_1": round(float((after[ok] == (yc[ok] + 1) % 10).float().mean()), 3),
            "flipped": round(float((after[ok] != yc[ok]).float().mean()), 3),
            "mask_mass_bottom_right_4x4": round(corner, 3),
        },
    }
    if not args.dynamic:
        # every restart, best objective first: what it did on the synthetic images (what the
        # gate sees) and, for evaluation only, on the real ones
        out["restarts"] = []
        for cand in inv.candidates:
            moved = predict(model, apply_trigger(x, cand.mask, cand.pattern, **MS))
            out["restarts"].append(
                {
                    "flip_rate": round(cand.flip_rate, 3),
                    "targets": len({t for t in cand.mapping if t >= 0}),
                    "mapping": cand.mapping,
                    "blend": cand.blend,
                    "mask_norm": round(cand.mask_norm, 1),
                    "peak_4x4": round(mask_peak_share(cand.mask, 4), 3),
                    "peak_8x8": round(mask_peak_share(cand.mask, 8), 3),
                    "real_to_y_plus_1": round(
                        float((moved[ok] == (yc[ok] + 1) % 10).float().mean()), 3
                    ),
                }
            )
    print(json.dumps(out))
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as fh:
        fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
