"""Is the class the removal made the student avoid still in the student's features?

Purifies one zoo model with the ``cnc`` preset (cached synthetic images and trigger
inversion, as ``bench/explore_purify.py``), then scores on the first ``--eval-n``
Fashion-MNIST test images:

- the student as returned, and with the class-prior correction's bias shift undone;
- an *oracle* linear probe: a new classifier fitted on the student's penultimate features of
  the other test images with their real labels (an upper bound of what any change of the
  last layer can recover; real labels, so a diagnostic, never a purification step);
- the avoided classes' classifier rows refit to the cleaned teacher's logits on the
  synthetic images (``calibrate.refit_to_prior``, data-free) at several ridges, and to the
  original model's logits (``refit_original_ridge_*``; ``refit_all_original_ridge_*``:
  every row but a named target's); each with the share of the stamped proxy images the
  student gives Neural Cleanse's class (``stamped_to_named``).

One JSON line per run goes to ``bench/results/head-probe.jsonl``. Example::

    PYTHONPATH=. .venv/bin/python bench/head_probe.py --attack clean --mode none
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.explore_purify import cached_inputs  # noqa: E402
from bench.prior_variants import stamped_share  # noqa: E402
from bench.synth_cache import model_key  # noqa: E402
from bench.zoo import eval_sets, load_zoo_model  # noqa: E402
from cnc_core.compress import CompressConfig  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.purify.calibrate import (  # noqa: E402
    classifier,
    features_and_logits,
    logits_of,
    refit_to_prior,
)
from cnc_core.purify.pipeline import (  # noqa: E402
    METHOD_COMPRESS_DEFAULTS,
    PurifyConfig,
    purify,
)

OUT = Path(__file__).resolve().parent / "results" / "head-probe.jsonl"
RIDGES = (1.0, 0.1, 0.01)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(FASHION_MNIST_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FASHION_MNIST_STD).view(1, -1, 1, 1)
    return (x - mean) / std


def _score(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    recall = [round(float((pred[labels == c] == c).float().mean() * 100), 1) for c in range(10)]
    return {"acc": round(float((pred == labels).float().mean() * 100), 2), "recall": recall}


def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(_normalise(b)).argmax(1) for b in x.split(500)])


def _oracle_probe(feats: torch.Tensor, labels: torch.Tensor, n_eval: int) -> torch.Tensor:
    """Predictions on the first ``n_eval`` rows of a softmax regression fitted (L-BFGS, a
    small L2 penalty) on the other rows' features and real labels."""
    train, test = feats[n_eval:], feats[:n_eval]
    weight = torch.zeros(feats.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, labels[n_eval:])
        loss = loss + 1e-4 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (test @ weight + bias).argmax(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", default="clean")
    p.add_argument("--mode", default="none")
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=16, help="the zoo's width")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, _meta = load_zoo_model(args.attack, args.mode, args.width)
    cc = CompressConfig(ratio=args.ratio, **METHOD_COMPRESS_DEFAULTS.get("cnc", {}))
    # the bias-shift rule as run, so that every refit below starts from the same student
    # (the preset's refit to the original where nothing is named is the variant
    # ``refit_original_ridge_0.1``)
    cfg = PurifyConfig.for_method("cnc", compress=cc, seed=args.seed)
    cfg = dataclasses.replace(cfg, prior_unnamed_ridge=None)
    key = model_key(args.attack, args.mode, args.width)
    synth, proxies = cached_inputs(model, cfg, key)
    res = purify(
        model,
        cfg,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        input_shape=(3, 32, 32),
        synthetic=synth,
        proxies=proxies,
    )
    rec = res.detection["prior_correction"]
    assert res.prior_reference_logits is not None and rec.get("refit") is None
    student = res.model
    head = classifier(student, 10)
    assert head is not None
    clean = eval_sets(args.attack, args.mode)["clean"]
    assert clean is not None
    x, y = clean
    n = args.eval_n
    out: dict[str, Any] = {"attack": key, "ratio": args.ratio, "seed": args.seed, "eval_n": n}
    out["corrected"], out["shift"] = rec["corrected"], rec["shift"]
    # what the preset names (the refit to the original applies where this is empty)
    out["named"], out["named_by_share"] = rec["spared"], rec["named_by_share"]
    out["original"] = _score(_predict(model, x[:n]), y[:n])
    out["as_run"] = _score(_predict(student, x[:n]), y[:n])
    bias, weight = head.bias.detach().clone(), head.weight.detach().clone()
    with torch.no_grad():
        head.bias.sub_(torch.tensor(rec["shift"]))
    out["uncorrected"] = _score(_predict(student, x[:n]), y[:n])
    out["uncorrected"].update(stamped_share(student, res.proxies))
    feats, _ = features_and_logits(student, head, _normalise(x))
    out["oracle_probe"] = _score(_oracle_probe(feats, y, n), y[:n])
    uncorrected = head.bias.detach().clone()
    references = {"": res.prior_reference_logits, "original_": logits_of(model, synth)}
    # "all_original_": every row but a named target's refit to the original's logits
    references["all_original_"] = references["original_"]
    for (prefix, reference), ridge in itertools.product(references.items(), RIDGES):
        with torch.no_grad():
            head.bias.copy_(uncorrected)
            head.weight.copy_(weight)
        refit = refit_to_prior(
            student,
            synth,
            reference,
            num_classes=10,
            ridge=ridge,
            avoided_below=None if prefix.startswith("all") else rec["avoided_below"],
            spared=rec["spared"],
        )
        assert refit is not None
        out[f"refit_{prefix}ridge_{ridge:g}"] = {
            **_score(_predict(student, x[:n]), y[:n]),
            **stamped_share(student, res.proxies),
            "refit": refit.refit,
            "corrected": refit.corrected,
        }
    with torch.no_grad():
        head.bias.copy_(bias)
        head.weight.copy_(weight)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as fh:
        fh.write(json.dumps(out) + "\n")
    for name, row in out.items():
        if isinstance(row, dict):
            print(f"{name:>18}: {row['acc']:.2f}  recall {row['recall']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
