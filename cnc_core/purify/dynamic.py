"""Dynamic (input-dependent) permutation trigger inversion, for input-aware all-to-all attacks.

:func:`.permutation.permutation_inversion` looks for ONE mask + pattern that sends every class
to its own other class. An input-aware trigger (Nguyen & Tran, NeurIPS 2020) has no single
pattern: each image gets its own mask and pattern from a generator, and a trigger made for
another image does nothing (the attack trains on such "cross" samples). So we invert a small
*generator* instead of a pattern, as BTI-DBF does for dynamic triggers (Xu et al., "Towards
Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign Features", ICLR 2024):
a three-layer conv net ``g(x) -> (m(x), p(x))`` trained on synthetic images with the
permutation objective of :mod:`.permutation` and a spread term,

    loss = mean_i -log(1 - q_i[y_i]) - mi_weight * I(y; y') - spread_weight * H(y')
           + l1_weight * mean_i |m(x_i)|_1,

``q_i = softmax(f((1 - m(x_i)) x_i + m(x_i) p(x_i)))``, with ``I`` and ``H`` measured on ``q``
with the source class taken out and renormalised (the identity mapping also maximises
``I(y; y')`` on the full ``q``). The spread ``H(y')`` over a class-balanced batch is what
finds the permutation: without it the generator collapsed onto a natural attractor class,
with it it recovered InputAware all-to-all's y -> y + 1 mapping (explore-purify.md 4p). The
conv net's small receptive field gives it the attack generators' inductive bias (a pattern
made from the local image). Synthetic images only; labels are the model's own predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.progress import ProgressFn
from cnc_core.purify.permutation import _balanced_index, _entropy, _hard_statistics
from cnc_core.purify.proxies import Norm, _Frozen, _num_outputs, _reporter, predict
from cnc_core.purify.synthesis import to_tensor_stats

__all__ = [
    "DynamicInversionConfig",
    "DynamicInversionResult",
    "TriggerGenerator",
    "dynamic_inversion",
    "dynamic_stamp",
    "stamp_dynamic",
]


@dataclass(frozen=True)
class DynamicInversionConfig:
    """Settings of :func:`dynamic_inversion`."""

    steps: int = 200
    lr: float = 0.01
    l1_weight: float = 0.001  # on each image's mask sum (pixels)
    mi_weight: float = 1.0
    # extra weight on the spread of where images go, H(y'): a permutation sends each class
    # somewhere else, so y' is uniform over a class-balanced batch; natural attractors are not
    spread_weight: float = 4.0
    images_per_class: int = 12  # per step, drawn by the model's clean prediction
    hidden: int = 16  # channels of the generator
    mask_bias: float = -3.0  # initial mask logit: sigmoid(-3) = 5% of each pixel


class TriggerGenerator(nn.Module):
    """``x`` (pixels in [0, 1]) -> mask ``(N, 1, H, W)`` and pattern ``(N, C, H, W)`` in [0, 1]."""

    def __init__(self, channels: int, hidden: int, mask_bias: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels + 1, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        with torch.no_grad():
            last.bias[channels] = mask_bias
        self.channels = channels

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(pixels * 2 - 1)
        return torch.sigmoid(out[:, self.channels :]), torch.sigmoid(out[:, : self.channels])


@dataclass
class DynamicInversionResult:
    """The inverted trigger generator and what it does on the synthetic images."""

    generator: TriggerGenerator
    mask_norm: float  # mean mask sum per image (pixels)
    flip_rate: float
    mutual_information: float
    top_share: float
    mapping: list[int]


def _stamped_pixels(generator: nn.Module, pix: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 - m(x)) x + m(x) p(x)`` for pixel images ``pix`` in [0, 1], and the masks."""
    mask, pattern = generator(pix)
    return (1 - mask) * pix + mask * pattern, mask


def stamp_dynamic(
    images: Tensor, generator: nn.Module, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Tensor:
    """Stamp each normalised image with the trigger ``generator`` makes for it."""
    c = images.shape[1]
    m = to_tensor_stats(mean, c, images.device)
    s = to_tensor_stats(std, c, images.device)
    stamped, _ = _stamped_pixels(generator, (images * s + m).clamp(0, 1))
    return (stamped.clamp(0, 1) - m) / s


def dynamic_stamp(
    generator: nn.Module, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``stamp(images, rng)`` function (as :func:`.proxies.trigger_stamp`) giving each image
    the trigger ``generator`` makes for it; ``rng`` is unused (the trigger is deterministic)."""

    def stamp(images: Tensor, rng: torch.Generator) -> Tensor:
        with torch.no_grad():
            return stamp_dynamic(images, generator, mean=mean, std=std)

    return stamp


def dynamic_inversion(
    model: nn.Module,
    images: Tensor,
    config: DynamicInversionConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    stage: str = "proxies",
) -> DynamicInversionResult:
    """Train a trigger generator on synthetic ``images`` (normalised) against ``model``."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = images.device
    c = images.shape[1]
    m = to_tensor_stats(mean, c, device)
    s = to_tensor_stats(std, c, device)
    clean = predict(model, images)
    num_classes = _num_outputs(model, images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = TriggerGenerator(c, config.hidden, config.mask_bias).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    report = _reporter(progress, stage)

    def objective(idx: Tensor) -> Tensor:
        stamped, mask = _stamped_pixels(net, (images[idx] * s + m).clamp(0, 1))
        q = F.softmax(model((stamped - m) / s), dim=1)
        y = clean[idx]
        stay = q.gather(1, y[:, None]).squeeze(1)
        leave = -(1 - stay).clamp_min(1e-6).log().mean()
        onehot = F.one_hot(y, q.shape[1]).float()
        # where the images go once they leave: the identity maximises I(y; y') too, so the
        # information is measured on q with the source class taken out and renormalised
        away = q * (1 - onehot)
        away = away / away.sum(1, keepdim=True).clamp_min(1e-12)
        counts = onehot.sum(0)
        per_class = (onehot.T @ away) / counts.clamp_min(1)[:, None]
        present = counts > 0
        conditional = (_entropy(per_class) * present).sum() / present.sum()
        spread = _entropy(away.mean(0))
        mi = spread - conditional
        l1 = mask.flatten(1).sum(1).mean()
        loss = leave - config.mi_weight * mi - config.spread_weight * spread
        return loss + config.l1_weight * l1

    with _Frozen(model):
        for step in range(config.steps):
            idx = _balanced_index(clean.cpu(), config.images_per_class, gen).to(device)
            loss = objective(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report((step + 1) / max(config.steps, 1) * 0.95)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        predicted, mask_sums = [], []
        with torch.no_grad():
            for start in range(0, images.shape[0], 256):
                pix = (images[start : start + 256] * s + m).clamp(0, 1)
                stamped, mask = _stamped_pixels(net, pix)
                mask_sums.append(mask.flatten(1).sum(1))
                predicted.append(model((stamped - m) / s).argmax(1))
    flip, mi, top, mapping = _hard_statistics(clean, torch.cat(predicted), num_classes)
    report(1.0)
    return DynamicInversionResult(
        generator=net,
        mask_norm=float(torch.cat(mask_sums).mean()),
        flip_rate=flip,
        mutual_information=mi,
        top_share=top,
        mapping=mapping,
    )
