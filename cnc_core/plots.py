"""PNG plots for the report: per-layer spectra with kept ranks, and a one-page summary.

matplotlib with the Agg backend (no screen); each function writes one file and returns
its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnc_core.compress import LayerDecision  # noqa: E402


def plot_spectra(decisions: Sequence[LayerDecision], path: Path, *, max_layers: int = 48) -> Path:
    """Normalised singular values of both modes per decomposed layer.

    A dashed line marks each mode's kept rank; the scaling factors (right axis, grey)
    show how the rule reshaped the spectrum.
    """
    layers = [d for d in decisions if d.s_out][:max_layers]
    if not layers:
        return _empty(path, "no decomposable layers")
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, d in zip(axes.flat, layers, strict=False):
        modes = [("mode 1 (out)", d.s_out, d.f_out, d.ranks[0], "tab:blue")]
        if d.kind != "svd":
            modes.append(("mode 2 (in)", d.s_in, d.f_in, d.ranks[1], "tab:orange"))
        twin = ax.twinx() if d.scaled else None
        for label, s, f, rank, color in modes:
            xs = range(1, len(s) + 1)
            ax.plot(xs, s, color=color, lw=1.3, label=f"{label}: keep {rank}/{len(s)}")
            ax.axvline(rank, color=color, ls="--", lw=0.9)
            if twin is not None:
                twin.plot(xs, f, color=color, ls=":", lw=1.0, alpha=0.7)
        if twin is not None:
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("scale factor", fontsize=7, color="grey")
            twin.tick_params(labelsize=6)
        ax.set_title(f"{d.name} [{d.kind}]", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("component", fontsize=7)
        ax.set_ylabel("sigma / max", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle("Normalised singular-value spectra and kept ranks", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_summary(decisions: Sequence[LayerDecision], summary: dict[str, Any], path: Path) -> Path:
    """One page: parameters per layer before/after, kept-rank fractions, headline numbers.

    ``summary`` is a flat dict of headline items (label -> value) printed as text.
    """
    layers = [d for d in decisions if d.params_before > 0]
    fig = plt.figure(figsize=(12, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.4, 1], width_ratios=[2, 1])
    ax_params = fig.add_subplot(grid[0, :])
    xs = range(len(layers))
    ax_params.bar(xs, [d.params_before for d in layers], color="#bbbbbb", label="original")
    ax_params.bar(
        xs, [d.params_after for d in layers], color="tab:green", label="compact", width=0.55
    )
    ax_params.set_yscale("log")
    ax_params.set_xticks(list(xs))
    ax_params.set_xticklabels([d.name for d in layers], rotation=75, fontsize=6)
    ax_params.set_ylabel("parameters")
    ax_params.set_title("Parameters per layer")
    ax_params.legend(fontsize=8)

    ax_ranks = fig.add_subplot(grid[1, 0])
    decomposed = [d for d in layers if d.full_ranks[0] > 0]
    xr = range(len(decomposed))
    ax_ranks.bar(
        [x - 0.2 for x in xr],
        [d.ranks[0] / d.full_ranks[0] for d in decomposed],
        width=0.4,
        label="mode 1 kept",
    )
    ax_ranks.bar(
        [x + 0.2 for x in xr],
        [d.ranks[1] / max(d.full_ranks[1], 1) for d in decomposed],
        width=0.4,
        label="mode 2 kept",
    )
    ax_ranks.set_ylim(0, 1.05)
    ax_ranks.set_xticks(list(xr))
    ax_ranks.set_xticklabels([d.name for d in decomposed], rotation=75, fontsize=6)
    ax_ranks.set_ylabel("fraction of full rank")
    ax_ranks.legend(fontsize=7)
    ax_ranks.set_title("Kept ranks")

    ax_text = fig.add_subplot(grid[1, 1])
    ax_text.axis("off")
    lines = [f"{k}: {_fmt(v)}" for k, v in summary.items()]
    ax_text.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8)
    fig.suptitle("cnc: Clean & Compact summary", fontsize=13)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(counts: Sequence[int], path: Path, *, title: str) -> Path:
    """Bar chart of predicted classes (e.g. of adversarial proxies: the suspected target)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(counts)), counts, color="tab:red")
    ax.set_xticks(range(len(counts)))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _empty(path: Path, text: str) -> Path:
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
