"""The residual check (``cnc_core.purify.verify``) on purified students saved by
``bench/explore_purify.py --save``, beside their real ASR: what the data-free verdict caught
and what it missed. The check is the product's own function, run on the student with the
original model's Neural Cleanse run (cached by explore_purify) as ``original``.

    .venv/bin/python bench/residual_check.py --width 16 --tag s29-save-w16 \\
        --students bench/.cache/students [--suffix -cnc] [--out bench/results/X.md]

The class checked is the ``cnc`` run's suspected target (for a ``cnc-paper`` student,
Neural Cleanse's class on the original). Students are looked up as
``STUDENTS/w{width}-{attack}-{mode}-3x{suffix}`` for each run of
``--tag`` in ``bench/results/explore-log.jsonl``. ``--originals`` adds a row per original
(the backdoored model itself, checked as if purified: the check's recall on a removal that
did nothing). Rows go to stdout and, with ``--out``, to a markdown file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.explore_purify import LOG, _inversion  # noqa: E402
from bench.synth_cache import cached_synthetic, model_key, synth_key  # noqa: E402
from bench.zoo import load_zoo_model  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.export import load_compact  # noqa: E402
from cnc_core.purify.pipeline import PurifyConfig  # noqa: E402
from cnc_core.purify.verify import residual_check  # noqa: E402

HEADER = (
    "| model | checked | ACC / ASR (2,000 imgs) | treated | NC on the original: class, anomaly "
    "| verdict | class: growth, relative growth | blend reach, original -> checked "
    "| anomaly index before -> after | new outliers |"
)


def _runs(tag: str) -> dict[tuple[str, str], dict[str, Any]]:
    runs = {}
    for line in LOG.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("tag") == tag:
            attack, mode = rec["attack"].split("-")[:2]
            runs[(attack, mode)] = rec
    return runs


def _scores(acc: float, asr: float | None) -> str:
    return f"{acc:.2f} / " + ("-" if asr is None else f"{asr:.2f}")


def _reach(rec: dict[str, Any], k: int) -> str:
    shares = rec["blend_reach"].get(str(k))
    reasons = rec["reasons"].get(str(k), [])
    flag = f" ({', '.join(reasons)})" if reasons else ""
    return ("-" if shares is None else f"{shares[0]:.2f} -> {shares[1]:.2f}") + flag


def _row(name: str, kind: str, scores: str, rec: dict[str, Any], orig: Any) -> str:
    k = rec["class"]
    i = rec["classes"].index(k)
    return (
        f"| {name} | {kind} | {scores} | {rec.get('acted_on')} | {orig.suspected_target}, "
        f"{orig.anomaly_index:.2f} | **{rec['verdict']}** | {k}: {rec['mask_growth'][i]:.2f}x, "
        f"{rec['relative_growth'][i]:.2f}x | {_reach(rec, k)} "
        f"| {rec['original_anomaly_indices'][i]:.2f} -> "
        f"{rec['anomaly_indices'][i]:.2f} | {rec['new_outliers'] or '-'} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--tag", required=True)
    p.add_argument("--students", default="bench/.cache/students")
    p.add_argument("--suffix", default="", help="after the student folder's name")
    p.add_argument("--originals", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PurifyConfig.for_method("cnc")
    assert cfg.verify is not None
    rows = []
    for (attack, mode), run in sorted(_runs(args.tag).items()):
        folder = Path(args.students) / f"w{args.width}-{attack}-{mode}-3x{args.suffix}"
        if not folder.exists():
            continue
        model, _ = load_zoo_model(attack, mode, args.width)
        key = model_key(attack, mode, args.width)
        synth, _ = cached_synthetic(
            model, cfg.synthesis, key, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
        )
        orig = _inversion(model, synth, cfg, key, synth_key(cfg.synthesis))
        # the class the check asks about: the cnc pipeline's suspected target; for another
        # method's student (cnc-paper names the PGD histogram's top class), Neural
        # Cleanse's class on the original, the backdoor its removal had to take
        cnc = run.get("method", "cnc") == "cnc"
        acted = run.get("suspected_target") if cnc else orig.suspected_target
        checked = [("student", load_compact(folder), _scores(run["acc"], run.get("asr")))]
        if args.originals:
            before = _scores(run["acc_before"], run.get("asr_before"))
            checked.append(("original", model, before))
        for kind, net, scores in checked:
            rec = residual_check(
                net,
                synth,
                cfg.verify,
                original=orig,
                original_model=model,
                acted_on=acted,
                mean=FASHION_MNIST_MEAN,
                std=FASHION_MNIST_STD,
                num_classes=10,
            )
            rows.append(_row(f"{attack} {mode}", kind, scores, rec, orig))
            print(rows[-1], flush=True)
    if args.out:
        text = (
            f"# Residual check on saved students (width {args.width}, Fashion-MNIST)\n\n"
            f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__},"
            f" {args.threads} thread(s). Command: `python bench/residual_check.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
            + HEADER
            + "\n"
            + "|---" * 10
            + "|\n"
            + "\n".join(rows)
            + "\n"
        )
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
