"""One ZeroQ synthesis step (forward + input gradient) with the fused batch-statistics loss
against the same step in plain autograd ops, and the fused step on channels-last pixels (what
``synthesize`` does on CPU), timed round-robin on one zoo model.

    .venv/bin/python bench/synthesis_step.py --threads 2

Width-16 ResNet-18 (Fashion-MNIST zoo, not CIFAR-10), a batch of 256 random 3x32x32 images
as in the ``cnc`` preset. Prints the median step of each and their ratio, and checks that
all give the same gradient to float rounding. Writes ``bench/results/synthesis-step{tag}.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, reference_gflops  # noqa: E402
from bench.zoo import load_zoo_model  # noqa: E402
from cnc_core.purify.synthesis import (  # noqa: E402
    _BNInputRecorder,
    _input_loss,
    batch_statistics_loss_autograd,
)

RESULTS = Path(__file__).resolve().parent / "results"


class _AutogradRecorder(_BNInputRecorder):
    """The recorder with the plain-autograd batch term (the code before the fused one)."""

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        self.terms.append(batch_statistics_loss_autograd(inputs[0], module))


def _step(model: nn.Module, recorder: _BNInputRecorder, x: torch.Tensor) -> float:
    x.grad = None
    t0 = time.perf_counter()
    model(x)
    loss = recorder.pop() + _input_loss(x, False)
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_zoo_model("badnet", "all2one", 16)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    pixels = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    speed = reference_gflops()
    variants = {
        "autograd": (_AutogradRecorder, torch.contiguous_format),
        "fused": (_BNInputRecorder, torch.contiguous_format),
        "fused-cl": (_BNInputRecorder, torch.channels_last),
    }
    inputs = {
        name: pixels.clone(memory_format=layout).requires_grad_(True)
        for name, (_, layout) in variants.items()
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    grads: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats + 1):
        for name, (cls, _) in variants.items():
            rec = cls(model, per_sample=False)
            x = inputs[name]
            try:
                seconds = _step(model, rec, x)
            finally:
                rec.remove()
            if rep > 0:  # the first round warms up
                times[name].append(seconds)
            assert x.grad is not None
            grads[name] = x.grad.clone()
    # float64 reference gradient: how far each variant's float32 rounding takes it
    ref_model = copy.deepcopy(model).double()  # eval, parameters frozen, as the model is
    x64 = pixels.double().requires_grad_(True)
    rec = _BNInputRecorder(ref_model, per_sample=False)
    try:
        _step(ref_model, rec, x64)
    finally:
        rec.remove()
    assert x64.grad is not None
    med = {name: statistics.median(t) for name, t in times.items()}
    err = {name: float((g.double() - x64.grad).abs().max()) for name, g in grads.items()}
    scale = float(x64.grad.abs().max())
    lines = [
        "# One ZeroQ synthesis step: fused batch-statistics gradient vs plain autograd",
        "",
        f"Machine: {machine()['processor']} ({args.threads} torch threads), torch "
        f"{torch.__version__}; reference speed {speed:.0f} GFLOP/s (fp32 512x512 product). "
        f"Command: `python bench/synthesis_step.py --threads {args.threads}"
        f"{' --tag=' + args.tag if args.tag else ''}`.",
        "",
        f"Width-16 ResNet-18 (badnet-all2one zoo model), batch {args.batch}, forward + input "
        f"gradient, median of {args.repeats} round-robin repeats.",
        "",
        "| loss, pixel layout | step (s) | speed-up | largest gradient error vs float64 |",
        "|---|---|---|---|",
        *(
            f"| {label} | {med[name]:.3f} | {med['autograd'] / med[name]:.2f}x | {err[name]:.2e} |"
            for name, label in (
                ("autograd", "plain autograd, NCHW"),
                ("fused", "fused (`_BatchStatisticsLoss`), NCHW"),
                ("fused-cl", "fused, channels-last (`synthesize` on CPU)"),
            )
        ),
        "",
        f"Largest gradient {scale:.2e}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"synthesis-step{args.tag}.md").write_text(text)


if __name__ == "__main__":
    main()
