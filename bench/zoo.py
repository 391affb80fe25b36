"""The backdoored-model zoo: ResNet-18 (CIFAR stem) models trained on real Fashion-MNIST.

Nine models per width: one clean, and BadNet, Blended, WaNet and InputAware (stand-in, see
:mod:`cnc_core.backdoors.inputaware`), each all-to-one (target 0) and all-to-all
(``y -> (y + 1) mod 10``), BackdoorBench settings (poison rate 0.1). The data are Fashion-MNIST
(28x28 grey, padded to 32x32 and repeated to 3 channels), NOT CIFAR-10; every sidecar says so.

Training: SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a one-cycle learning-rate
schedule, batch 128, random crop (padding 4) + horizontal flip; the trigger is applied per
batch AFTER augmentation to a fixed, seeded set of samples (BackdoorBench's loop for WaNet and
InputAware), so the trigger is never shifted or flipped.

Usage::

    python bench/zoo.py --width 16                       # GPU budget: 60k images, 15 epochs
    python bench/zoo.py --width 16 --epochs 3 --train-subset 20000 --publish   # CPU budget

Models are cached as ``bench/.cache/zoo/w{W}/{name}.safetensors`` + ``{name}.json``; with
``--publish`` they are also copied to ``bench/models/w{W}/`` (small, committed).
:func:`load_zoo_model` looks in ``bench/models`` first, then in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnc_core.backdoors import (  # noqa: E402
    Attack,
    Mode,
    create_attack,
    make_poisoned_testset,
    plan_poison,
    poison_batch,
)
from cnc_core.datasets import (  # noqa: E402
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    normalize,
    to_cifar_shape,
)
from cnc_core.evaluate import accuracy, attack_success_rate  # noqa: E402
from cnc_core.models import create_model  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache" / "zoo"
MODELS_DIR = BENCH_DIR / "models"
DEFAULT_DATA_ROOT = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAME = "Fashion-MNIST (28x28 grey padded to 32x32, repeated to 3 channels)"

ARCH = "resnet18"
ATTACKS: tuple[str, ...] = ("badnet", "blended", "wanet", "inputaware")
MODES: tuple[Mode, ...] = ("all2one", "all2all")
#: (attack, mode) of every zoo model; the clean model has attack "clean", mode "none".
#: Order = training order: all-to-one first (what the benchmark needs first), then clean.
ZOO: tuple[tuple[str, str], ...] = (
    tuple((a, "all2one") for a in ATTACKS)
    + (("clean", "none"),)
    + tuple((a, "all2all") for a in ATTACKS)
)
TARGET = 0
POISON_RATE = 0.1
ATTACK_SEED = 0  # fixes each trigger (Blended's pattern, WaNet's warp, InputAware's nets)
NUM_CLASSES = 10


def _create_model(width: int) -> nn.Module:
    return create_model(ARCH, num_classes=NUM_CLASSES, in_chans=3, width=width)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults are the GPU budget (full data, 15 epochs)."""

    width: int = 16
    epochs: int = 15
    train_subset: int | None = None  # None: all 60,000 training images
    batch_size: int = 128
    lr: float = 0.1  # one-cycle peak
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "crop_flip": random crop (pad 4) + horizontal flip; "flip"; "none". Before the trigger.
    augment: str = "crop_flip"
    seed: int = 0


def zoo_name(attack: str, mode: str) -> str:
    """File stem of a zoo model: ``clean`` or ``{attack}-{mode}``."""
    if attack == "clean":
        return "clean"
    if attack not in ATTACKS or mode not in MODES:
        raise ValueError(f"unknown zoo model {attack!r}/{mode!r}; attacks {ATTACKS}, modes {MODES}")
    return f"{attack}-{mode}"


def make_attack(attack: str) -> Attack:
    """The zoo's trigger for ``attack`` (fixed seed, 32x32x3)."""
    return create_attack(attack, image_size=32, channels=3, seed=ATTACK_SEED)


@lru_cache(maxsize=2)
def _split(split: str, data_root: str) -> tuple[Tensor, Tensor]:
    return load_fashion_mnist(Path(data_root), split)  # type: ignore[arg-type]


def eval_sets(
    attack: str, mode: str, data_root: Path = DEFAULT_DATA_ROOT
) -> dict[str, tuple[Tensor, Tensor] | None]:
    """The 10,000 Fashion-MNIST test images, clean and triggered, for ACC and ASR.

    Returns
    -------
    dict
        ``"clean"``: (images float (N, 3, 32, 32) in [0, 1], labels); ``"poisoned"``: the
        triggered test set and attack labels (:func:`make_poisoned_testset`), or ``None`` for
        the clean model.
    """
    x_u8, y = _split("test", str(data_root))
    x = to_cifar_shape(x_u8)
    sets: dict[str, tuple[Tensor, Tensor] | None] = {"clean": (x, y), "poisoned": None}
    if attack != "clean":
        zoo_name(attack, mode)  # validates
        sets["poisoned"] = make_poisoned_testset(
            x,
            y,
            make_attack(attack),
            mode=mode,
            target=TARGET,
            num_classes=NUM_CLASSES,  # type: ignore[arg-type]
        )
    return sets


def _augment(x: Tensor, g: torch.Generator, crop: bool = True) -> Tensor:
    """Random crop with 4 px zero padding (if ``crop``) + horizontal flip, per sample."""
    n, _, h, w = x.shape
    if not crop:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        out = x.clone()
        out[flip] = out[flip].flip(-1)
        return out
    padded = F.pad(x, (4, 4, 4, 4))  # (N, C, h+8, w+8)
    oy = torch.randint(0, 9, (n,), generator=g).to(x.device)
    ox = torch.randint(0, 9, (n,), generator=g).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, h, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]  # (N, C, h, w)
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    out[flip] = out[flip].flip(-1)
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": name or platform.machine(),
    }


def train_model(
    attack: str,
    mode: str,
    cfg: TrainConfig,
    *,
    device: torch.device,
    data_root: Path = DEFAULT_DATA_ROOT,
    log: Any = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one zoo model from scratch; return it (eval mode) and its metadata."""
    name = zoo_name(attack, mode)
    t0 = time.perf_counter()
    x_all, y_all = _split("train", str(data_root))
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.train_subset is not None and cfg.train_subset < x_all.shape[0]:
        idx = torch.randperm(x_all.shape[0], generator=g)[: cfg.train_subset]
        x_all, y_all = x_all[idx], y_all[idx]
    n = x_all.shape[0]
    atk = None if attack == "clean" else make_attack(attack)
    if atk is not None:
        plan = plan_poison(
            y_all,
            mode=mode,
            target=TARGET,
            rate=POISON_RATE,  # type: ignore[arg-type]
            cross_ratio=atk.cross_ratio,
            seed=cfg.seed,
        )
        poison_mask, cross_mask = plan.poison_mask, plan.cross_mask
    else:
        poison_mask = cross_mask = torch.zeros(n, dtype=torch.bool)

    torch.manual_seed(cfg.seed)
    model = _create_model(cfg.width).to(device)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=True,
    )
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    mean = torch.tensor(FASHION_MNIST_MEAN, device=device)
    std = torch.tensor(FASHION_MNIST_STD, device=device)
    x_dev, y_dev = x_all.to(device), y_all.to(device)

    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        total_loss, seen, correct = 0.0, 0, 0
        for start in range(0, n, cfg.batch_size):
            bi = order[start : start + cfg.batch_size]
            xb = to_cifar_shape(x_dev[bi.to(device)])  # (B, 3, 32, 32) in [0, 1]
            yb = y_dev[bi.to(device)]
            if cfg.augment != "none":
                xb = _augment(xb, g, crop=cfg.augment == "crop_flip")
            if atk is not None:
                xb, yb = poison_batch(
                    xb,
                    yb,
                    poison_mask[bi],
                    cross_mask[bi],
                    atk,
                    mode=mode,  # type: ignore[arg-type]
                    target=TARGET,
                    num_classes=NUM_CLASSES,
                    generator=g,
                )
            logits = model(normalize(xb, mean, std))
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * yb.shape[0]
            correct += int((logits.argmax(1) == yb).sum())
            seen += yb.shape[0]
        log(
            f"[{name} w{cfg.width}] epoch {epoch + 1}/{cfg.epochs} loss {total_loss / seen:.4f} "
            f"train-acc {100 * correct / seen:.2f}% ({time.perf_counter() - t0:.0f}s)"
        )

    train_s = time.perf_counter() - t0
    model.eval()
    sets = eval_sets(attack, mode, data_root)
    x_te, y_te = sets["clean"]  # type: ignore[misc]
    acc = accuracy(model, x_te, y_te, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, device=device)
    asr = None
    if sets["poisoned"] is not None:
        xp, yp = sets["poisoned"]
        asr = attack_success_rate(
            model, xp, yp, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, device=device
        )
    meta: dict[str, Any] = {
        "name": name,
        "dataset": DATASET_NAME,
        "arch": ARCH,
        "width": cfg.width,
        "num_classes": NUM_CLASSES,
        "num_params": sum(p.numel() for p in model.parameters()),
        "attack": attack,
        "mode": mode,
        "target": TARGET if attack != "clean" else None,
        "poison_rate": POISON_RATE if attack != "clean" else 0.0,
        "num_poisoned": int(poison_mask.sum()),
        "num_cross": int(cross_mask.sum()),
        "attack_params": repr(atk) if atk is not None else None,
        "attack_seed": ATTACK_SEED,
        "mean": list(FASHION_MNIST_MEAN),
        "std": list(FASHION_MNIST_STD),
        "train": asdict(cfg),
        "train_images": n,
        "clean_acc": round(acc, 2),
        "asr": None if asr is None else round(asr, 2),
        "test_images": int(y_te.shape[0]),
        "wall_time_s": round(train_s, 1),
        "machine": _machine(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": "bench/zoo.py",
    }
    return model, meta


def _paths(directory: Path, attack: str, mode: str, width: int) -> tuple[Path, Path]:
    stem = directory / f"w{width}" / zoo_name(attack, mode)
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_zoo_model(model: nn.Module, meta: dict[str, Any], directory: Path) -> Path:
    """Write ``{name}.safetensors`` + ``{name}.json`` under ``directory/w{width}``."""
    weights, sidecar = _paths(directory, meta["attack"], meta["mode"], meta["width"])
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"name": meta["name"], "dataset": meta["dataset"]})
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def find_zoo_model(attack: str, mode: str, width: int) -> tuple[Path, Path] | None:
    """Paths of a trained model: committed ``bench/models`` first, then the cache."""
    for directory in (MODELS_DIR, CACHE_DIR):
        weights, sidecar = _paths(directory, attack, mode, width)
        if weights.is_file() and sidecar.is_file():
            return weights, sidecar
    return None


def load_zoo_model(
    attack: str, mode: str, width: int = 16, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a zoo model (eval mode) and its sidecar metadata.

    Raises
    ------
    FileNotFoundError
        If it was never trained; the message says how to train it.
    """
    found = find_zoo_model(attack, mode, width)
    if found is None:
        raise FileNotFoundError(
            f"no zoo model {zoo_name(attack, mode)} at width {width}; "
            f"train it with: python bench/zoo.py --width {width} --attacks {attack}"
        )
    weights, sidecar = found
    meta = json.loads(sidecar.read_text())
    model = _create_model(width)
    model.load_state_dict(load_file(str(weights)))  # safetensors: no pickle involved
    return model.to(device).eval(), meta


def _cached_matches(sidecar: Path, cfg: TrainConfig) -> bool:
    try:
        return json.loads(sidecar.read_text()).get("train") == asdict(cfg)
    except (OSError, ValueError):
        return False


def summary_table(width: int, directory: Path = MODELS_DIR) -> str:
    """A markdown table of the sidecars under ``directory/w{width}``, in zoo order."""
    rows = [
        "| model | clean ACC % | ASR % | train images x epochs | augment | train s | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for attack, mode in ZOO:
        sidecar = _paths(directory, attack, mode, width)[1]
        if not sidecar.is_file():
            continue
        m = json.loads(sidecar.read_text())
        asr = "-" if m["asr"] is None else f"{m['asr']:.2f}"
        rows.append(
            f"| {m['name']} | {m['clean_acc']:.2f} | {asr} | {m['train_images']} x "
            f"{m['train']['epochs']} | {m['train']['augment']} | {m['wall_time_s']:.0f} | "
            f"{m['machine']['device_name']} ({m['machine']['device']}) |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=16)
    p.add_argument(
        "--attacks",
        default="all",
        help="comma list of clean,badnet,blended,wanet,inputaware or 'all'",
    )
    p.add_argument("--modes", default="all2one,all2all")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--train-subset", type=int, default=None, help="images (default: all 60k)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--augment", choices=("crop_flip", "flip", "none"), default="crop_flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--publish", action="store_true", help="copy results to bench/models/")
    p.add_argument("--summary", action="store_true", help="print bench/models' table and exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summary_table(args.width))
        return 0

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cfg = TrainConfig(
        width=args.width,
        epochs=args.epochs,
        train_subset=args.train_subset,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        seed=args.seed,
    )
    wanted = set(ATTACKS) | {"clean"} if args.attacks == "all" else set(args.attacks.split(","))
    modes = args.modes.split(",")
    jobs = [(a, m) for a, m in ZOO if a in wanted and (a == "clean" or m in modes)]
    if not jobs:
        p.error(f"nothing selected from {ZOO}")

    summary = []
    for attack, mode in jobs:
        weights, sidecar = _paths(CACHE_DIR, attack, mode, cfg.width)
        if not args.force and weights.is_file() and _cached_matches(sidecar, cfg):
            meta = json.loads(sidecar.read_text())
            print(f"[{meta['name']} w{cfg.width}] cached", flush=True)
        else:
            _, meta = _train_and_save(attack, mode, cfg, device, args.data_root)
        if args.publish:
            dst_w, dst_j = _paths(MODELS_DIR, attack, mode, cfg.width)
            dst_w.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, dst_w)
            shutil.copyfile(sidecar, dst_j)
        summary.append(meta)

    print(f"\n{DATASET_NAME}, {ARCH} width {cfg.width}")
    print(f"{'model':<22}{'ACC %':>8}{'ASR %':>8}{'train s':>9}")
    for meta in summary:
        asr = "-" if meta["asr"] is None else f"{meta['asr']:.2f}"
        print(f"{meta['name']:<22}{meta['clean_acc']:>8.2f}{asr:>8}{meta['wall_time_s']:>9.0f}")
    return 0


def _train_and_save(
    attack: str, mode: str, cfg: TrainConfig, device: torch.device, data_root: Path
) -> tuple[nn.Module, dict[str, Any]]:
    def log(msg: str) -> None:
        print(msg, flush=True)

    model, meta = train_model(attack, mode, cfg, device=device, data_root=data_root, log=log)
    save_zoo_model(model, meta, CACHE_DIR)
    asr = "-" if meta["asr"] is None else f"{meta['asr']:.2f}%"
    log(
        f"[{meta['name']} w{cfg.width}] ACC {meta['clean_acc']:.2f}% ASR {asr} "
        f"in {meta['wall_time_s']:.0f}s"
    )
    return model, meta


if __name__ == "__main__":
    raise SystemExit(main())
