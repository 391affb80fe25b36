"""The backdoor benchmark: defenses on backdoored ResNet-18s trained on real Fashion-MNIST.

    .venv/bin/python bench/zoo.py --width 16 ...        # once: train / cache the models
    .venv/bin/python bench/backdoor.py --width 16       # evaluate the defenses
    .venv/bin/python bench/backdoor.py --width 16 --ratios 3 4 --eval-n 2000   # the CPU table

For each zoo model (BadNet, Blended, WaNet, InputAware stand-in; all-to-one target 0 and
all-to-all; poison rate 0.1; see ``bench/zoo.py``) this measures ACC and ASR on the 10,000
Fashion-MNIST test images (NOT CIFAR-10) for: no defense, CLP (u=3) + the same compression,
compression only, and C&C (method ``cnc``) at each ratio, plus ablations at 3x (with
scaling, no proxies, no fine-tuning). No real image is used by any defense: purification sees only
the model. Writes ``bench/results/backdoor-w{W}{tag}.md`` (the paper's layout) and ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved_latency, machine  # noqa: E402
from bench.prior_variants import prior_variants, stamped_share  # noqa: E402
from bench.synth_cache import cached_synthetic, model_key  # noqa: E402
from bench.zoo import DEFAULT_DATA_ROOT, eval_sets, load_zoo_model  # noqa: E402
from cnc_core.cli import parse_knob  # noqa: E402
from cnc_core.compress import split_compress_knobs  # noqa: E402
from cnc_core.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from cnc_core.evaluate import accuracy, attack_success_rate  # noqa: E402
from cnc_core.metrics import count_macs, count_params  # noqa: E402
from cnc_core.purify.calibrate import logits_of  # noqa: E402
from cnc_core.purify.pipeline import PurifyConfig, purify  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTACKS = [
    (a, m) for m in ("all2one", "all2all") for a in ("badnet", "blended", "wanet", "inputaware")
]
SHAPE = (3, 32, 32)
MEAN, STD = tuple(FASHION_MNIST_MEAN), tuple(FASHION_MNIST_STD)

# Ablations of the default pipeline, run at 3x: knob overrides on the `cnc` preset. The
# preset applies no singular-value scaling (method.md: no reading helped once fine-tuning
# ran), so that row adds the reading that damps the dominant directions (paper, Fig. 1).
ABLATIONS: dict[str, dict[str, Any]] = {
    # the preset's refit and singular-value scaling are exclusive: this row swaps one for the other
    "+ scaling (clip, T=0.5; no refit)": {"scaling": "clip", "t_scale": 0.5, "refit": False},
    "no proxies (no cleaning, unlearning, sensitivity)": {
        "proxy_weight": 0.0,
        "sensitivity": False,
        "cleaning": False,
    },
    "no fine-tuning": {"epochs": 0},
    "no feature distillation": {"feature_weight": 0.0},
}


_NOT_PRINTED = ("timings", "detection", "prior_variants")  # long row entries


def purify_config(method: str, ratio: float, seed: int, knobs: dict[str, Any]) -> PurifyConfig:
    """The ``method`` preset at ``ratio`` with flat knobs (compression ones included)."""
    cc_kwargs, rest = split_compress_knobs(knobs)
    base = PurifyConfig.for_method(method, seed=seed).compress
    cc = dataclasses.replace(base, ratio=ratio, **cc_kwargs)
    return PurifyConfig.from_knobs(method=method, compress=cc, seed=seed, knobs=rest)


def _eval_sets(attack: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The test sets, cut to the first ``--eval-n`` clean (and triggered) images."""
    sets = eval_sets(attack, mode, args.data_root)
    n = args.eval_n
    return {k: None if v is None else (v[0][:n], v[1][:n]) for k, v in sets.items()}


def _score(model: torch.nn.Module, sets: dict[str, Any], device: torch.device) -> dict[str, float]:
    x, y = sets["clean"]
    out = {"acc": accuracy(model, x, y, mean=MEAN, std=STD, device=device)}
    if sets["poisoned"] is not None:
        xp, yp = sets["poisoned"]
        out["asr"] = attack_success_rate(model, xp, yp, mean=MEAN, std=STD, device=device)
    return out


def evaluate_model(
    attack: str, mode: str, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Every defense on one zoo model."""
    model, meta = load_zoo_model(attack, mode, args.width, device)
    sets = _eval_sets(attack, mode, args)
    name = f"{attack}-{mode}"
    rows: dict[str, Any] = {
        "none": {
            **_score(model, sets, device),
            "params": count_params(model),
            "macs": count_macs(model, SHAPE),
            "seconds": 0.0,
        }
    }
    print(f"[{name}] no defense {rows['none']}", flush=True)

    def run(
        label: str,
        method: str,
        ratio: float,
        knobs: dict[str, Any] | None = None,
        synthetic: torch.Tensor | None = None,
        proxies: Any = None,
        original_logits: torch.Tensor | None = None,
    ) -> Any:
        cfg = purify_config(method, ratio, args.seed, {**args.knobs, **(knobs or {})})
        t0 = time.perf_counter()
        result = purify(
            model,
            cfg,
            mean=MEAN,
            std=STD,
            input_shape=SHAPE,
            device=device,
            synthetic=synthetic,
            proxies=proxies,
        )
        seconds = time.perf_counter() - t0
        row = {
            **_score(result.model, sets, device),
            "params": count_params(result.model),
            "macs": count_macs(result.model, SHAPE),
            "seconds": seconds,
            "suspected_target": result.suspected_target,
            "timings": result.timings,
            "detection": result.detection,
            "best_epoch": result.finetune.best_epoch if result.finetune else None,
        }
        prior = result.detection.get("prior_correction", {})
        if "shift" in prior and prior.get("refit") is None and synthetic is not None:
            row["prior_variants"] = prior_variants(
                result.model,
                synthetic,
                prior,
                lambda m: {**_score(m, sets, device), **stamped_share(m, result.proxies)},
                iterations=cfg.prior_correction,
                reference_logits=result.prior_reference_logits,
                original_logits=original_logits,
            )
            print(f"[{name}] {label} prior variants: {json.dumps(row['prior_variants'])}")
        rows[label] = row
        # the first purified model of each column is the one the latency table times: the
        # cnc preset's allocation reads the model's responses, so architectures differ
        args.timed_models.setdefault(label, (name, result.model))
        print(
            f"[{name}] {label}: "
            + json.dumps({k: v for k, v in row.items() if k not in _NOT_PRINTED}),
            flush=True,
        )
        return result

    if "clp" in args.methods:
        run(f"clp {args.ratios[0]:g}x", "clp", args.ratios[0])
    if "compress" in args.methods:
        for ratio in args.ratios:
            run(f"compress {ratio:g}x", "compress", ratio)
    for method in ("cnc", "cnc-paper"):
        if method not in args.methods:
            continue
        # Synthetic images are made once per model and shared across ratios (they depend
        # only on the original model); the standalone wall time adds their cost back.
        cfg = purify_config(method, args.ratios[0], args.seed, args.knobs)
        synthetic, made = cached_synthetic(
            model,
            dataclasses.replace(cfg.synthesis, image_shape=SHAPE),
            model_key(attack, mode, args.width),
            mean=MEAN,
            std=STD,
            device=device,
        )
        synth_s = made["seconds"]  # None: cached before sidecars recorded the time
        # the original's logits on them, for the prior variants that refit to the original
        inputs = {"synthetic": synthetic, "original_logits": logits_of(model, synthetic)}
        proxies = None
        for ratio in args.ratios:
            result = run(f"{method} {ratio:g}x", method, ratio, proxies=proxies, **inputs)
            row = rows[f"{method} {ratio:g}x"]
            row["synthesis_seconds"], row["synthesis_cached"] = synth_s, made["cached"]
            if synth_s is not None:
                row["seconds"] += synth_s
            proxies = result.proxies
        if method == "cnc" and args.ablations:
            for label, knobs in ABLATIONS.items():
                run(f"cnc 3x {label}", "cnc", 3.0, knobs, proxies=proxies, **inputs)
    return {
        "attack": attack,
        "mode": mode,
        "train": meta.get("train"),
        "zoo_acc": meta.get("acc"),
        "zoo_asr": meta.get("asr"),
        "rows": rows,
    }


def latency_table(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Params, MACs and batch-1/64 latency of the original and of the compact models the run
    produced (the first attack's model of each column), timed side by side.

    The ``cnc`` preset allocates ranks on each model's own response spectra, so its compact
    architecture differs from what ``compress`` makes of the weights alone: the models
    timed are the purified ones, not a re-compression.
    """
    model, _ = load_zoo_model("clean", "all2one", args.width, device)
    models: dict[str, torch.nn.Module] = {"original": model}
    sources = {"original": "clean"}
    for label, (source, compact) in args.timed_models.items():
        models[label], sources[label] = compact.eval(), source
    lat = {
        b: interleaved_latency(
            list(models.values()), SHAPE, batch_size=b, device=device, repeats=args.latency_repeats
        )
        for b in (1, 64)
    }
    return [
        {
            "model": label,
            "from": sources[label],
            "params": count_params(m),
            "macs": count_macs(m, SHAPE),
            "latency_b1_ms": lat[1][i],
            "latency_b64_ms": lat[64][i],
        }
        for i, (label, m) in enumerate(models.items())
    ]


def floor_asr(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The clean model's rate of predicting the attack label on triggered inputs."""
    model, _ = load_zoo_model("clean", "all2one", args.width, device)
    out = {}
    for attack, mode in ATTACKS:
        xp, yp = _eval_sets(attack, mode, args)["poisoned"]
        out[f"{attack}-{mode}"] = attack_success_rate(
            model, xp, yp, mean=MEAN, std=STD, device=device
        )
    return out


def to_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    results = data["results"]
    columns = [c for c in results[0]["rows"]] if results else []
    lines = [
        f"# Backdoor benchmark: ResNet-18 width {data['width']} on Fashion-MNIST (not CIFAR-10)",
        "",
        f"Machine: {m.get('cuda_device') or m['processor']} ({m['cpu_count']} CPUs), torch "
        f"{m['torch']}, device {data['device']}. Command: `{data['command']}`.",
        *(
            f"Merged: `{part['command']}` ran on {part['machine']} "
            f"({part['threads']} torch threads); its rows replace the earlier ones."
            for part in data.get("merged_from", [])[1:]
        ),
        f"ACC / ASR in % on the first {data.get('eval_n', 10_000):,} test images "
        "(ASR: all-to-one on non-target images; "
        "all-to-all as (y+1) mod 10). No real image is used by any defense.",
        "",
        "| attack | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for r in results:
        cells = []
        for c in columns:
            row = r["rows"].get(c)
            cells.append("-" if row is None else f"{row['acc']:.2f} / {row.get('asr', 0):.2f}")
        lines.append(f"| {r['attack']} {r['mode']} | " + " | ".join(cells) + " |")
    # summary rows: mean ACC drop and mean / max ASR per column
    drops, asrs = [], []
    for c in columns:
        d = [r["rows"]["none"]["acc"] - r["rows"][c]["acc"] for r in results if c in r["rows"]]
        a = [r["rows"][c].get("asr", 0.0) for r in results if c in r["rows"]]
        drops.append(f"{statistics.mean(d):.2f}" if d else "-")
        asrs.append(f"{statistics.mean(a):.2f} / {max(a):.2f}" if a else "-")
    lines.append("| **mean ACC drop** | " + " | ".join(drops) + " |")
    lines.append("| **mean / max ASR** | " + " | ".join(asrs) + " |")
    lines += [
        "",
        f"Params, MACs (where recorded) and purification wall time (s, standalone: synthesis "
        f"included; "
        f"{m.get('torch_threads', '?')} torch thread(s) per process; * synthesis time not "
        "recorded, reused from the cache):",
        "",
        "| attack | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for r in results:
        cells = [
            f"{r['rows'][c]['params']:,} / "
            + (f"{r['rows'][c]['macs'] / 1e6:.1f}M / " if "macs" in r["rows"][c] else "")
            + f"{r['rows'][c]['seconds']:.0f}s"
            + ("*" if r["rows"][c].get("synthesis_seconds", 0) is None else "")
            if c in r["rows"]
            else "-"
            for c in columns
        ]
        lines.append(f"| {r['attack']} {r['mode']} | " + " | ".join(cells) + " |")
    lines += _variant_lines(results, columns)
    if data.get("floor"):
        lines += [
            "",
            "ASR floor (clean model on triggered inputs): "
            + ", ".join(f"{k} {v:.2f}" for k, v in data["floor"].items()),
        ]
    if data.get("latency"):
        lines += [
            "",
            "| model | purified from | params | MACs | latency b1 (ms) | latency b64 (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for row in data["latency"]:
            lines.append(
                f"| {row['model']} | {row.get('from', '-')} | {row['params']:,} | "
                f"{row['macs'] / 1e6:.1f}M | "
                f"{row['latency_b1_ms']:.2f} | {row['latency_b64_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _variant_lines(results: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """The class-prior correction variants (bench/prior_variants.py) of each column that
    recorded them: ACC / ASR per model, and the mean ACC drop and mean / max ASR."""
    lines: list[str] = []
    for c in columns:
        have = [r for r in results if "prior_variants" in r["rows"].get(c, {})]
        if not have:
            continue
        names = ["as run", *have[0]["rows"][c]["prior_variants"]]
        lines += [
            "",
            f"{c}: the class-prior correction's variants, the same student (only the "
            "classifier differs: its biases, and for a row refit the corrected classes' "
            "rows; bench/prior_variants.py). A row without variants "
            "whose correction moved no class (* ) has the run's scores in every column: no "
            "variant moves a class the run's rule left alone.",
            "",
            "| attack | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        scores: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for r in results:
            row = r["rows"].get(c, {})
            variants = row.get("prior_variants") or _unmoved(row, names[1:])
            if variants is None:
                continue
            cells = []
            for n in names:
                v = row if n == "as run" else variants[n]
                drop = r["rows"]["none"]["acc"] - v["acc"]
                scores[n].append((drop, v.get("asr", 0.0)))
                cells.append(f"{v['acc']:.2f} / {v.get('asr', 0.0):.2f}")
            star = "" if "prior_variants" in row else " *"
            lines.append(f"| {r['attack']} {r['mode']}{star} | " + " | ".join(cells) + " |")
        lines.append(
            "| **mean ACC drop; mean / max ASR** | "
            + " | ".join(
                f"{statistics.mean(d for d, _ in scores[n]):.2f}; "
                f"{statistics.mean(a for _, a in scores[n]):.2f} / "
                f"{max(a for _, a in scores[n]):.2f}"
                for n in names
            )
            + " |"
        )
    return lines


def _unmoved(row: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """The variants of a row recorded before variants were (session 23's), where its
    correction moved no class: each one is the row itself. None otherwise."""
    prior = row.get("detection", {}).get("prior_correction", {})
    if "shift" not in prior or any(prior["shift"]) or prior.get("corrected"):
        return None
    return {n: row for n in names}


def merge(paths: list[Path], stem: Path) -> None:
    """One table from runs split over attacks, or from a full run and re-runs of some attacks:
    a later file's rows replace an earlier file's rows of the same attack (row by row, so a
    re-run of the cnc columns keeps the earlier baseline columns); results in the
    benchmark's attack order; machine, floor and latency from the first file that has them;
    the commands listed."""
    parts = [json.loads(p.read_text()) for p in paths]
    data = {**parts[0], "command": " ; ".join(p["command"] for p in parts)}
    data["merged_from"] = [
        {
            "command": p["command"],
            "machine": p["machine"].get("cuda_device") or p["machine"]["processor"],
            "threads": p["machine"]["torch_threads"],
        }
        for p in parts
    ]
    order = {f"{a}-{m}": i for i, (a, m) in enumerate(ATTACKS)}
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in part["results"]:
            name = f"{r['attack']}-{r['mode']}"
            if name in merged:
                merged[name]["rows"].update(r["rows"])
            else:
                merged[name] = {**r, "rows": dict(r["rows"])}
    data["results"] = sorted(
        merged.values(), key=lambda r: order.get(f"{r['attack']}-{r['mode']}", 99)
    )
    for key in ("floor", "latency"):
        data[key] = next((p[key] for p in parts if p.get(key)), None)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text(to_markdown(data))
    print(to_markdown(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument(
        "--attacks", nargs="+", default=["all"], help="e.g. badnet-all2one wanet-all2all, or all"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["clp", "compress", "cnc"],
        help="any of clp compress cnc cnc-paper",
    )
    parser.add_argument("--ablations", action="store_true", help="cnc 3x ablation rows")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="knob override for every purification (JSON value)",
    )
    parser.add_argument(
        "--eval-n",
        type=int,
        default=10_000,
        help="score on the first N clean and the first N triggered test images (10,000: all)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="only merge the results files of runs split over attacks (in parallel) into "
        "backdoor-w{W}{tag}.md/.json; nothing is run",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where backdoor-w{W}{tag}.md/.json go (rewritten after each attack)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="folder with the Fashion-MNIST idx .gz files",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        merge(args.merge, args.results_dir / f"backdoor-w{args.width}{args.tag}")
        return
    args.knobs = dict(parse_knob(item) for item in args.set)
    args.timed_models = {}
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    chosen = ATTACKS if args.attacks == ["all"] else [tuple(a.split("-", 1)) for a in args.attacks]
    data: dict[str, Any] = {
        "machine": machine(),
        "device": str(device),
        "width": args.width,
        "eval_n": args.eval_n,
        "command": "python bench/backdoor.py " + " ".join(sys.argv[1:]),
        "knobs": args.knobs,
        "results": [],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"backdoor-w{args.width}{args.tag}"
    data["floor"] = floor_asr(args, device)
    for attack, mode in chosen:
        data["results"].append(evaluate_model(attack, mode, args, device))
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2))  # partial results
        stem.with_suffix(".md").write_text(to_markdown(data))
    data["latency"] = latency_table(args, device)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text(to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
