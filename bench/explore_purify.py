"""Research runs for data-free backdoor removal on the zoo models (CPU-sized).

One run = one pipeline variant on one zoo model at one ratio, through the real
``cnc_core.purify.pipeline.purify``; synthetic images and the trigger inversion of the
ORIGINAL model are cached under ``bench/.cache/explore/`` so variants of the later stages are
cheap. ACC/ASR are measured on the first ``--eval-n`` Fashion-MNIST test images (clean) and
triggered test images. Each run appends one JSON line to ``bench/results/explore-log.jsonl``.

Example::

    .venv/bin/python bench/explore_purify.py --attack badnet --ratio 3 \\
        --set epochs=10 --set sensitivity=false
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prior_variants import VARIANTS, Variant, prior_variants  # noqa: E402
from bench.synth_cache import CACHE, cached_synthetic, model_key, synth_key  # noqa: E402
from bench.zoo import eval_sets, load_zoo_model  # noqa: E402
from cnc_core.compress import CompressConfig  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.evaluate import accuracy, attack_success_rate  # noqa: E402
from cnc_core.export import ModelSpec, save_compact  # noqa: E402
from cnc_core.purify.calibrate import mean_probs  # noqa: E402
from cnc_core.purify.pipeline import METHOD_COMPRESS_DEFAULTS, PurifyConfig, purify  # noqa: E402
from cnc_core.purify.proxies import (  # noqa: E402
    TriggerInversionResult,
    make_proxies,
    proxies_from_inversion,
)

LOG = Path(__file__).resolve().parent / "results" / "explore-log.jsonl"


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _inversion(
    model: torch.nn.Module, images: torch.Tensor, cfg: PurifyConfig, key: str, skey: str
) -> TriggerInversionResult:
    inv = cfg.proxy.inversion
    path = CACHE / (
        f"{key}-inv-{skey}-st{inv.steps}-l1{inv.l1_weight}-ipc"
        f"{inv.images_per_class}-lr{inv.lr}-s{cfg.proxy.seed}.pt"
    )
    if path.exists():
        d = torch.load(path, weights_only=True)
        return TriggerInversionResult(**d)
    ps = make_proxies(model, images, cfg.proxy, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    assert ps.inversion is not None
    torch.save(dataclasses.asdict(ps.inversion), path)
    return ps.inversion


def _recall(net: Any, xc: Any, yc: Any) -> list[float]:
    """Each class's recall (%) of ``net`` on the images ``xc`` labelled ``yc``."""
    ms = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    return [round(accuracy(net, xc[yc == c], yc[yc == c], **ms), 2) for c in range(10)]


def _scores(net: Any, xc: Any, yc: Any, sets: dict[str, Any], n: int) -> dict[str, Any]:
    """ACC, ASR and each class's recall of ``net`` on the first ``n`` test images."""
    ms = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    out = {"acc": accuracy(net, xc, yc, **ms), "recall": _recall(net, xc, yc)}
    if sets["poisoned"] is not None:
        xp, yp = sets["poisoned"][0][:n], sets["poisoned"][1][:n]
        out["asr"] = attack_success_rate(net, xp, yp, **ms)
    return out


def _prior_variants(
    res: Any, original: Any, synth: Any, xc: Any, yc: Any, sets: dict, args: Any
) -> dict[str, Any]:
    """The same student under the correction's variants (bench/prior_variants.py: without
    it, the session 23 rule, capped shifts) and, where the run matched the cleaned teacher,
    corrected against the original model instead (session 22, explore-purify.md 4aa)."""
    rec = res.detection["prior_correction"]
    variants: dict[str, Variant | None] = dict(VARIANTS)
    if rec["reference"] == "cleaned":
        cap = rec.get("max_shift", 3.0)
        variants["original"] = Variant(cap, True, mean_probs(original, synth))
    return prior_variants(
        res.model,
        synth,
        rec,
        lambda m: _scores(m, xc, yc, sets, args.eval_n),
        iterations=10,
        variants=variants,
        reference_logits=res.prior_reference_logits,
    )


def cached_inputs(model: Any, cfg: PurifyConfig, key: str) -> tuple[Any, Any]:
    """The synthetic images and (for trigger inversion) the proxies of ``model`` under
    ``cfg``, from the cache under ``bench/.cache/explore/`` or made and cached."""
    synth, _made = cached_synthetic(
        model, cfg.synthesis, key, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
    )
    if cfg.proxy.kind != "trigger_inversion":
        return synth, None
    inv = _inversion(model, synth, cfg, key, synth_key(cfg.synthesis))
    gen = torch.Generator().manual_seed(cfg.proxy.seed)
    proxies = proxies_from_inversion(
        model,
        synth,
        inv,
        use=cfg.proxy.inversion.use,
        anomaly_threshold=cfg.proxy.inversion.anomaly_threshold,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        generator=gen,
    )
    return synth, proxies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", default="badnet")
    p.add_argument("--mode", default="all2one")
    p.add_argument("--method", default="cnc")
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="purify knob=value (repeatable)")
    p.add_argument("--compress", action="append", default=[], help="CompressConfig field=value")
    p.add_argument("--tag", default="")
    p.add_argument("--width", type=int, default=16, help="the zoo's width")
    p.add_argument("--save", default=None, help="write the purified model here (save_compact)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, _meta = load_zoo_model(args.attack, args.mode, args.width)
    knobs = {}
    for item in args.set:
        k, _, v = item.partition("=")
        knobs[k] = _parse_value(v)
    cc_kwargs = {}
    for item in args.compress:
        k, _, v = item.partition("=")
        cc_kwargs[k] = _parse_value(v)
    defaults = METHOD_COMPRESS_DEFAULTS.get(args.method, {})
    cc = CompressConfig(ratio=args.ratio, **{**defaults, **cc_kwargs})
    cfg = PurifyConfig.from_knobs(method=args.method, compress=cc, seed=args.seed, knobs=knobs)
    key = model_key(args.attack, args.mode, args.width)
    t0 = time.perf_counter()
    synth = proxies = None
    if args.method.startswith("cnc"):
        synth, proxies = cached_inputs(model, cfg, key)
    t_cache = time.perf_counter() - t0
    res = purify(
        model,
        cfg,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        input_shape=(3, 32, 32),
        synthetic=synth,
        proxies=proxies,
    )
    t_total = time.perf_counter() - t0
    if args.save and res.compress is not None:
        spec = ModelSpec(
            arch="resnet18",
            num_classes=10,
            width=args.width,
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
        )
        save_compact(res.model, Path(args.save), spec, res.compress.surgery_record())

    sets = eval_sets(args.attack, args.mode)
    clean = sets["clean"]
    assert clean is not None
    xc, yc = clean[0][: args.eval_n], clean[1][: args.eval_n]
    ms = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    out: dict[str, Any] = {
        "attack": key,
        "method": args.method,
        "ratio": args.ratio,
        "knobs": knobs,
        "compress": cc_kwargs,
        "tag": args.tag,
        "eval_n": args.eval_n,
        "acc_before": accuracy(model, xc, yc, **ms),
        "acc": accuracy(res.model, xc, yc, **ms),
    }
    # where the accuracy goes, class by class (session 22): recall before / after
    out["recall_before"], out["recall"] = _recall(model, xc, yc), _recall(res.model, xc, yc)
    if args.mode == "all2one":
        # where the accuracy goes: the recall of the attack's target class (0) on clean
        # images, before and after (session 9: the removal costs most of its ACC there)
        t = yc == 0
        out["target_recall_before"] = accuracy(model, xc[t], yc[t], **ms)
        out["target_recall"] = accuracy(res.model, xc[t], yc[t], **ms)
        # and how often clean images of other classes are called the target: the part of
        # the ASR that no trigger causes (a student that avoids the target has a low one)
        zeros = torch.zeros_like(yc[~t])
        out["target_fp_before"] = accuracy(model, xc[~t], zeros, **ms)
        out["target_fp"] = accuracy(res.model, xc[~t], zeros, **ms)
    if sets["poisoned"] is not None:
        xp, yp = sets["poisoned"][0][: args.eval_n], sets["poisoned"][1][: args.eval_n]
        out["asr_before"] = attack_success_rate(model, xp, yp, **ms)
        out["asr"] = attack_success_rate(res.model, xp, yp, **ms)
    det = res.detection
    rec = det.get("prior_correction", {})
    if "shift" in rec and rec.get("refit") is None and synth is not None:
        out["prior_variants"] = _prior_variants(res, model, synth, xc, yc, sets, args)
    out["suspected_target"] = res.suspected_target
    if "trigger_inversion" in det:
        out["anomaly_index"] = round(det["trigger_inversion"]["anomaly_index"], 2)
        out["mask_norms"] = [round(v, 1) for v in det["trigger_inversion"]["mask_norms"]]
    out["pgd_before"] = det.get("pgd_before")
    out["pgd_after"] = det.get("pgd_after")
    out["inv_after_share"] = det.get("inverted_trigger_after_share")
    out["suppressed"] = det.get("sensitivity_suppressed")
    for name in (
        "teacher_cleaning",
        "target_synthesis",
        "disputed_dropped",
        "prior_correction",
        "verify",
    ):
        if name in det:
            out[name] = det[name]
    if "permutation_inversion" in det:
        out["permutation"] = det["permutation_inversion"]
    if "dynamic_inversion" in det:
        out["dynamic"] = det["dynamic_inversion"]
    if "warp_inversion" in det:
        out["warp"] = det["warp_inversion"]
    if "all_to_all_stamp" in det:
        out["all_to_all_stamp"] = det["all_to_all_stamp"]
    if res.finetune is not None:
        out["best_epoch"] = res.finetune.best_epoch
        out["averaged"] = res.finetune.averaged
        out["averaged_score"] = res.finetune.averaged_score
        out["history"] = [{k: round(v, 3) for k, v in h.items()} for h in res.finetune.history]
    out["params"] = (
        (res.compress.params_before, res.compress.params_after) if res.compress else None
    )
    out["timings"] = {k: round(v, 1) for k, v in res.timings.items()}
    out["cache_s"], out["total_s"] = round(t_cache, 1), round(t_total, 1)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as fh:
        fh.write(json.dumps(out) + "\n")
    short = {
        k: out.get(k)
        for k in (
            "attack",
            "method",
            "ratio",
            "knobs",
            "acc_before",
            "acc",
            "asr_before",
            "asr",
            "target_recall_before",
            "target_recall",
            "target_fp",
            "recall_before",
            "recall",
            "suspected_target",
            "anomaly_index",
            "suppressed",
            "best_epoch",
            "averaged",
            "total_s",
        )
    }
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
