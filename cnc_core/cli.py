"""The ``cnc`` command line: ``cnc compress``, ``cnc purify`` and ``cnc inspect``.

Exit codes: 0 done, 2 bad usage, 3 bad input (checkpoint, settings, data), 4 the work
failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0.5 or 0.48,0.46,0.41: {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="checkpoint: .safetensors or a torch.save'd state dict")
    p.add_argument("--arch", required=True, help="architecture name (see `cnc inspect --list`)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="channel width (default: the architecture's standard width)",
    )
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--input-size", type=int, default=32, help="input height = width in pixels")
    p.add_argument(
        "--mean",
        type=_floats,
        default=(0.0,),
        help="input normalisation mean, one value or one per channel",
    )
    p.add_argument("--std", type=_floats, default=(1.0,), help="input normalisation std")


def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ratio",
        type=float,
        default=3.0,
        help="whole-model parameter ratio, original / compact (>= 1)",
    )
    p.add_argument(
        "--mac-ratio",
        type=float,
        default=None,
        help="also hold multiply-accumulates per image to original / this (>= 1); "
        "the allocation keeps the fewer ranks of the two budgets",
    )
    p.add_argument("--allocation", default=None, help="rank allocation strategy")
    p.add_argument("--scaling", default=None, help="singular-value scaling rule")
    p.add_argument("--t-scale", type=float, default=None, help="the scaling rule's T_scale")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="advanced knob (JSON value), e.g. --set epochs=5; repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnc",
        description="Clean & Compact: remove backdoors from and compress CNN classifiers, "
        "data-free (Phan et al., ECCV 2024).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compress", help="compress a model (no purification)")
    _model_args(p)
    _compress_args(p)
    _run_args(p)
    p = sub.add_parser("purify", help="remove a backdoor and compress, data-free")
    _model_args(p)
    _compress_args(p)
    _run_args(p)
    p.add_argument("--method", default="cnc", help="cnc | cnc-paper | clp | compress")
    p.add_argument("--eval-clean", type=Path, help=".npz (images, labels) to measure ACC")
    p.add_argument(
        "--eval-poisoned", type=Path, help=".npz (images, labels = attack target) to measure ASR"
    )
    p = sub.add_parser("inspect", help="print layers, spectra and what would be compressed")
    p.add_argument("model", type=Path, nargs="?")
    p.add_argument("--list", action="store_true", help="list the known architectures")
    p.add_argument("--arch")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--input-size", type=int, default=32, help="input height = width in pixels")
    _compress_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _knobs(args: argparse.Namespace) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    for key in ("allocation", "scaling"):
        if getattr(args, key, None) is not None:
            knobs[key] = getattr(args, key)
    if getattr(args, "t_scale", None) is not None:
        knobs["t_scale"] = args.t_scale
    if getattr(args, "mac_ratio", None) is not None:
        knobs["mac_ratio"] = args.mac_ratio
    for item in getattr(args, "set", []):
        key, value = parse_knob(item)
        knobs[key] = value
    return knobs


def parse_knob(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (a bare word stays a string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


class _Bar:
    """A tqdm bar fed by the (stage, fraction) progress callback."""

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=1000,
            disable=not enabled,
            unit="‰",
            dynamic_ncols=True,
            bar_format="{desc:<28} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )

    def __call__(self, stage: str, fraction: float) -> None:
        self._bar.set_description_str(stage[:28])
        self._bar.update(max(0, int(fraction * 1000) - self._bar.n))

    def close(self) -> None:
        self._bar.close()


def _run(args: argparse.Namespace) -> int:
    from cnc_core.job import JobConfig, run_job
    from cnc_core.report_md import write_report_md

    method = getattr(args, "method", "compress")
    config = JobConfig(
        arch=args.arch,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        input_size=args.input_size,
        width=args.width,
        mean=args.mean,
        std=args.std,
        method=method,
        ratio=args.ratio,
        seed=args.seed,
        device=args.device,
        export_onnx=not args.no_onnx,
        advanced=_knobs(args),
    )
    eval_sets = _eval_sets(args, config)
    bar = _Bar(enabled=not args.quiet)
    try:
        result = run_job(args.model, args.out, config, progress=bar)
    finally:
        bar.close()
    report = result.report
    if eval_sets:
        report["evaluation"] = _evaluate(args, config, result, eval_sets)
        (result.out_dir / "report.json").write_text(json.dumps(report, indent=2))
        write_report_md(result.out_dir, report)
    comp = report.get("compression", {})
    ratios = report["metrics"]["ratios"]
    print(f"wrote {len(result.artifacts)} artifacts to {result.out_dir}")
    print(
        f"  parameters {comp.get('params_before', 0):,} -> {comp.get('params_after', 0):,} "
        f"({ratios['param ratio']:.2f}x), MACs {ratios['MAC ratio']:.2f}x fewer"
    )
    for key, value in ratios.items():
        if key.startswith("speed-up"):
            print(f"  {key}: {value:.2f}x")
    if result.suspected_target is not None:
        print(f"  suspected backdoor target class: {result.suspected_target}")
    residual = (report.get("detection") or {}).get("verify")
    if residual and residual["verdict"] == "residual":
        print(
            f"  WARNING: removal unconfirmed: class {residual['class']}'s trigger is still "
            f"small on the purified model (grew {residual['relative_growth_of_class']:.2f}x "
            "the median class's); see the report"
        )
    elif residual:
        print(f"  residual check: {residual['verdict']} (see the report)")
    for key, value in report.get("evaluation", {}).items():
        print(f"  {key}: {value:.2f}%")
    print(f"  device {result.device}; report {result.artifacts['report.md']} (and .json)")
    return 0


def _model_spec(config: Any) -> Any:
    """The :class:`~cnc_core.export.ModelSpec` of a JobConfig (architecture and input)."""
    from cnc_core.export import ModelSpec

    return ModelSpec(
        arch=config.arch,
        num_classes=config.num_classes,
        in_chans=config.in_chans,
        width=config.width,
        input_size=config.input_size,
    )


def _eval_sets(args: argparse.Namespace, config: Any) -> dict[str, tuple[Any, Any]]:
    """The user's evaluation sets, read and checked BEFORE the job runs (a wrong shape is an
    error in a second, not after minutes of purification): ``{"ACC": ..., "ASR": ...}``."""
    from cnc_core.evaluate import load_eval_npz

    expected = _model_spec(config).input_shape
    sets = {}
    for flag, label in (("eval_clean", "ACC"), ("eval_poisoned", "ASR")):
        path = getattr(args, flag, None)
        if path is None:
            continue
        images, labels = load_eval_npz(path)
        shape = tuple(images.shape[1:])
        if shape != expected:
            raise ValueError(f"{path}: images have shape {shape}, the model takes {expected}")
        if int(labels.max()) >= config.num_classes:
            raise ValueError(
                f"{path}: label {int(labels.max())} is out of range "
                f"for {config.num_classes} classes"
            )
        sets[label] = (images, labels)
    return sets


def _evaluate(
    args: argparse.Namespace, config: Any, result: Any, sets: dict[str, tuple[Any, Any]]
) -> dict[str, float]:
    """ACC / ASR of the original and the compact model on the user's own data."""
    from cnc_core.evaluate import accuracy
    from cnc_core.export import load_compact
    from cnc_core.io import load_checkpoint

    original = load_checkpoint(args.model, _model_spec(config).build())
    compact = load_compact(result.out_dir)
    out: dict[str, float] = {}
    for label, (images, labels) in sets.items():
        for name, model in (("original", original), ("purified", compact)):
            out[f"{label} {name}"] = accuracy(
                model, images, labels, mean=config.mean, std=config.std
            )
    return out


def _inspect(args: argparse.Namespace) -> int:
    from cnc_core.models import list_models

    if args.list or args.model is None:
        print("\n".join(list_models()))
        return 0
    if args.arch is None or args.num_classes is None:
        raise ValueError("inspect MODEL needs --arch and --num-classes")
    from cnc_core.compress import CompressConfig, compress
    from cnc_core.io import load_checkpoint
    from cnc_core.models import create_model

    model = load_checkpoint(
        args.model,
        create_model(
            args.arch, num_classes=args.num_classes, in_chans=args.in_chans, width=args.width
        ),
    )
    knobs = _knobs(args)
    result = compress(
        model,
        CompressConfig(ratio=args.ratio, **knobs),
        input_shape=(args.in_chans, args.input_size, args.input_size),
    )
    if args.json:
        print(
            json.dumps(
                {"summary": result.summary(), "layers": [d.surgery() for d in result.decisions]},
                indent=2,
            )
        )
        return 0
    print(f"{args.arch} (width {args.width}): {result.params_before:,} parameters")
    print(
        f"at {args.ratio}x ({result.config.allocation}): {result.params_after:,} parameters, "
        f"achieved {result.achieved_ratio:.3f}x; MACs per image "
        f"{result.macs_before or 0:,} -> {result.macs_after or 0:,}\n"
    )
    print(
        f"{'layer':<28} {'kind':<8} {'weight':<16} {'ranks kept':<14} {'r90':<9} "
        f"{'cut':<6} {'params':>18}  note"
    )
    for d in result.decisions:
        ranks = (
            f"{d.ranks[0]}/{d.full_ranks[0]},{d.ranks[1]}/{d.full_ranks[1]}"
            if d.full_ranks[0]
            else "-"
        )
        shape = "x".join(map(str, d.weight_shape))
        params = f"{d.params_before:,}->{d.params_after:,}"
        r90, cut = _spectrum_summary(d.s_out, d.ranks[0])
        print(
            f"{d.name:<28} {d.kind:<8} {shape:<16} {ranks:<14} {r90:<9} {cut:<6} "
            f"{params:>18}  {d.reason}"
        )
    print(
        "\nr90: mode-1 components holding 90% of the spectral energy / all; "
        "cut: normalised singular value of the last mode-1 component kept."
    )
    return 0


def _spectrum_summary(s_norm: list[float], kept: int) -> tuple[str, str]:
    if not s_norm:
        return "-", "-"
    energy = [v * v for v in s_norm]
    total, running, r90 = sum(energy), 0.0, len(energy)
    for i, e in enumerate(energy):
        running += e
        if running >= 0.9 * total:
            r90 = i + 1
            break
    return f"{r90}/{len(s_norm)}", f"{s_norm[max(kept, 1) - 1]:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cnc_core.progress import Cancelled

    try:
        if args.command == "inspect":
            return _inspect(args)
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
        # CheckpointError and CompressionError are ValueErrors with a readable reason
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
