"""Fine-tuning a compact student on synthetic and proxy images, and BN recalibration.

The loss (C&C, Phan et al., ECCV 2024, step 8 of ``method.md``):

* knowledge distillation (Hinton et al., 2015) of the teacher's (original model's) outputs
  on clean synthetic images, at a temperature, which keeps accuracy; and
* unlearning on proxy images (synthetic images carrying an adversarial or inverted trigger),
  labelled with the teacher's prediction on the CLEAN source image (hard labels: CE; soft
  labels: the teacher's clean logits, distilled), which removes the backdoor.

Early stopping needs no real data: a held-out slice of the synthetic and proxy images gives
``agreement`` (student agrees with the teacher on clean synthetic) and ``proxy_fix`` (student
gives the proxy its clean label); the best epoch by their sum is restored.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.progress import ProgressFn

__all__ = [
    "BN_MODES",
    "OPTIMIZERS",
    "PROXY_LABELS",
    "STAMPED_BATCHES",
    "FinetuneConfig",
    "FinetuneResult",
    "agreement",
    "finetune",
    "forward_batches",
    "recalibrate_bn",
]

#: BN handling while fine-tuning: "eval" freezes running statistics (affine still trains);
#: "train" uses batch statistics and updates the running ones.
BN_MODES = ("eval", "train")
#: ``FinetuneConfig.optimizer`` and ``proxy_labels`` choices.
OPTIMIZERS = ("adam", "sgd")
PROXY_LABELS = ("hard", "soft")
LOGIT_TEACHER_ON = ("all", "agreed")  # where the original's logits join the targets
#: ``FinetuneConfig.stamped_batch`` choices: how stamped images meet BN in train mode.
STAMPED_BATCHES = ("separate", "joint", "both")

#: Largest teacher cache (logits + distilled BN outputs on the fixed training images) kept
#: in memory instead of running the teacher on every batch: 0.55 GB for 922 images of a
#: width-16 ResNet-18 at 32x32; a width-64 one with 2,048 images needs more and runs the
#: teacher each step.
TEACHER_CACHE_BYTES = 2 << 30

RefreshFn = Callable[[nn.Module, int], tuple[Tensor, Tensor]]
#: ``stamp(images, generator) -> images`` puts a (proxy) trigger on normalised images.
StampFn = Callable[[Tensor, torch.Generator], Tensor]
#: ``refresh_stamp(student, epoch) -> stamp`` re-inverts the trigger on the current student.
StampRefreshFn = Callable[[nn.Module, int], StampFn]


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings."""

    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    batch_size: int = 128  # per loss term: clean and proxy batches have this size each
    temperature: float = 4.0  # KD temperature
    kd_weight: float = 1.0
    proxy_weight: float = 1.0
    # Feature distillation: MSE between student and teacher outputs of every BN layer the two
    # share by name (same shapes: surgery replaces convs, never BNs), each normalised by the
    # teacher's mean square. Dense, per-pixel supervision from each synthetic image, where the
    # logits give ten numbers; 0 turns it off.
    feature_weight: float = 0.0
    # Share of those BN layers distilled, the shallowest first (1.0: all). Distilling only
    # the shallow half or quarter did not keep the blended backdoor out (explore-purify.md 4i).
    feature_depth: float = 1.0
    bn_mode: str = "eval"
    recalibrate: bool = True  # recalibrate BN statistics on the synthetic images first
    # ... and once more at the end: with bn_mode "train" the running statistics drift with
    # the weights and mix proxy batches in; a last pass on clean synthetic images fixes both
    final_recalibrate: bool = True
    early_stopping: bool = True
    patience: int = 3  # epochs without improvement before stopping
    holdout: float = 0.1  # share of images kept out of training for the criterion
    refresh_every: int = 0  # call ``refresh`` every k epochs (0: never)
    # Random shift (up to ``shift`` px, reflect padding) + horizontal flip of the clean
    # synthetic images each step, the teacher run on the augmented batch. Off by default:
    # measured, it slowed KD's recovery of real accuracy (explore-purify.md, section 3).
    augment: bool = False
    shift: int = 4
    flip: bool = True
    # Mixup of the clean synthetic images (Zhang et al., ICLR 2018) for distillation: each
    # image blended with another of its batch at a Beta(mixup, mixup) weight, the teacher run
    # on the mixed batch each step (its logits and BN outputs are the targets), so the
    # student is taught on more than the fixed synthetic set. 0: off (the default): measured
    # in explore-purify 4x, mixup=1.0 re-implants Blended's backdoor (a blend is what it
    # teaches: Blended all-to-one 84.65 / 91.75) and costs BadNet all-to-all 1.65 ACC points.
    mixup: float = 0.0
    # With a ``logit_teacher`` (the pipeline passes the ORIGINAL model where the teacher is a
    # cleaned copy of it): share of its logits in the distillation target and the clean
    # labels, ``(1 - share) * teacher + share * logit_teacher``; the BN outputs still come
    # from ``teacher``. The cleaned teacher has lost much of the target class (recall 88 ->
    # 54-78%, explore-purify 4n), which its logits pass on; the original's logits on clean
    # synthetic images are right, and the trigger's path is what feature distillation from
    # the cleaned teacher and unlearning remove. 0: the teacher's logits alone.
    logit_teacher_share: float = 0.0
    # ... on every image ("all"), or only where the two teachers name the same class
    # ("agreed"; elsewhere the teacher's logits alone: the synthetic images the original
    # sends to the backdoor target and the cleaned teacher does not carry the trigger)
    logit_teacher_on: str = "all"
    # With a ``stamp`` function: share of each batch stamped with the trigger (after
    # augmentation, as a real trigger is applied) and labelled by the teacher on the clean
    # augmented image: "hard" (its arg-max, CE) or "soft" (its logits, KD).
    stamp_fraction: float = 0.5
    proxy_labels: str = "hard"
    # With a ``stamp`` function: stamped copies of this share of the synthetic images join
    # the clean ones whenever BN statistics are re-estimated (before training and after each
    # epoch). Statistics of clean images alone let a blend trigger back in: the same
    # Blended student measured 78.25 / 62.3 (ACC / ASR) recalibrated on clean synthetic
    # images, 75.35 / 2.25 on clean + stamped (explore-purify.md 4k): the trigger's channels
    # are normalised by a spread that includes the (inverted) trigger's own response.
    recal_stamped: float = 0.0
    # Weight averaging (SWA; Izmailov et al., UAI 2018): the student's weights averaged over
    # the ends of epochs ``average_from`` .. ``epochs``, BN statistics then re-estimated as
    # after any epoch. With ``early_stopping`` the average competes with the best epoch by
    # the same held-out score and is kept when it scores at least as well; without, it is
    # the result. 0: off.
    average_from: int = 0
    # With a ``stamp`` function, how a step's stamped images go through the student:
    # "separate", a forward pass of their own after the clean batch's, so in BN train mode
    # they are normalised by the statistics of stamped images alone (which absorb much of a
    # trigger's constant response, and shift every layer's statistics away from the clean
    # ones); "joint", one forward pass of clean + stamped images, normalised by the mix's
    # statistics as at test time (running statistics of clean + stamped images,
    # ``recal_stamped``); "both": the stamped images in both passes, the proxy loss the mean
    # of the two (one more forward pass of the stamped share).
    stamped_batch: str = "separate"
    # With an ``all_to_all_stamp`` (the permutation or dynamic trigger, kept apart from the
    # others by the pipeline when either setting below is given): the stamped images are
    # split in two halves, the second stamped with the all-to-all trigger, going through
    # the student as ``all_to_all_batch`` says (None: as ``stamped_batch``) and unlearnt at
    # ``all_to_all_weight`` (None: ``proxy_weight``); each half's loss counts by its share
    # of the stamped images, so equal settings weigh as one mixed batch does.
    all_to_all_batch: str | None = None
    all_to_all_weight: float | None = None
    seed: int = 0

    def all_to_all_settings(self) -> tuple[str, float]:
        """The all-to-all stamp's batch mode and weight, the unset ones inherited."""
        weight = self.proxy_weight if self.all_to_all_weight is None else self.all_to_all_weight
        return self.all_to_all_batch or self.stamped_batch, weight


@dataclass
class FinetuneResult:
    """Per-epoch history (dicts of floats) and the epoch restored."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("-inf")
    stopped_early: bool = False
    # with ``average_from``: how many epochs were averaged, the average's held-out score
    # (early stopping only) and whether the average is the model returned
    averaged_epochs: int = 0
    averaged_score: float | None = None
    averaged: bool = False


def _named_bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for _, m in _named_bns(model)]


def forward_batches(
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    progress: ProgressFn | None = None,
    stage: str = "",
    share: float = 1.0,
) -> None:
    """Run ``model`` over ``images`` in batches for its side effects (BN statistics,
    hooks), reporting ``share`` of the stage's progress as it goes."""
    n = images.shape[0]
    for start in range(0, n, batch_size):
        model(images[start : start + batch_size])
        if progress is not None:
            progress(stage, min((start + batch_size) / max(n, 1), 1.0) * share)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 128,
    progress: ProgressFn | None = None,
    stage: str = "recalibrate",
) -> None:
    """Re-estimate every BN layer's running statistics on ``images`` (in place).

    After rank truncation and scaling the stored statistics are stale (``method.md``,
    pitfalls); a cumulative average over the synthetic images replaces them. Parameters are
    untouched; the model's train/eval mode is restored.
    """
    layers = _bn_layers(model)
    if not layers:
        return
    was = model.training
    saved = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    try:
        forward_batches(model, images, batch_size, progress, stage)
    finally:
        for bn, mom in zip(layers, saved, strict=True):
            bn.momentum = mom
        model.train(was)


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, images: Tensor, batch_size: int = 256) -> float:
    """Share of ``images`` on which ``a`` and ``b`` (both in eval mode) predict the same."""
    wa, wb = a.training, b.training
    a.eval()
    b.eval()
    try:
        same = 0
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
    finally:
        a.train(wa)
        b.train(wb)
    return same / max(images.shape[0], 1)


@torch.no_grad()
def _logits(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat(
            [model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        )
    finally:
        model.train(was)


def _kd(student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:
    """Hinton's KD loss, scaled by T^2 so its gradient size does not depend on T."""
    return F.kl_div(
        F.log_softmax(student_logits / t, 1),
        F.log_softmax(teacher_logits / t, 1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


class _BNTaps:
    """Forward hooks collecting the outputs of the BN layers that two models share by name."""

    def __init__(self, student: nn.Module, teacher: nn.Module, depth: float = 1.0) -> None:
        s_bns, t_bns = dict(_named_bns(student)), dict(_named_bns(teacher))
        shared = [n for n in s_bns if n in t_bns]  # in module order: shallow to deep
        self.names = shared[: max(1, round(depth * len(shared)))] if shared else []
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self._handles = [
            s_bns[n].register_forward_hook(self._keep(self.student, n)) for n in self.names
        ] + [t_bns[n].register_forward_hook(self._keep(self.teacher, n)) for n in self.names]
        self.active = False

    def feature_bytes(self, teacher: nn.Module, sample: Tensor) -> int:
        """Bytes of the tapped teacher outputs per image (one eval forward of ``sample``)."""
        with torch.no_grad():
            self.active = True
            try:
                teacher(sample[:1])
            finally:
                self.active = False
        total = sum(t.numel() * t.element_size() for t in self.teacher.values())
        self.teacher.clear()
        self.student.clear()
        return total

    def _keep(self, store: dict[str, Tensor], name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: object, out: Tensor) -> None:
            if self.active:
                store[name] = out

        return hook

    @torch.no_grad()
    def teacher_outputs(
        self, teacher: nn.Module, images: Tensor, batch_size: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The teacher's logits and tapped BN outputs on every image (eval mode), for a
        fixed training set: the per-step teacher forward is then a lookup."""
        logits: list[Tensor] = []
        maps: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self.active = True
        try:
            for start in range(0, images.shape[0], batch_size):
                logits.append(teacher(images[start : start + batch_size]))
                for n in self.names:
                    maps[n].append(self.teacher.pop(n))
        finally:
            self.active = False
            self.student.clear()
        return torch.cat(logits), {n: torch.cat(v) for n, v in maps.items()}

    def loss(self, rows: int | None = None) -> Tensor:
        """Mean over layers of MSE(student, teacher) / mean(teacher^2), then cleared.

        ``rows``: only the first ``rows`` images of the student's batch have a teacher
        output (the rest of a joint batch, ``FinetuneConfig.stamped_batch``, is stamped)."""
        terms = []
        for n in self.names:
            s, t = self.student.get(n), self.teacher.get(n)
            if s is not None and rows is not None:
                s = s[:rows]
            if s is None or t is None or s.shape != t.shape:
                continue
            t = t.detach()
            terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8))
        self.student.clear()
        self.teacher.clear()
        if not terms:
            raise ValueError("feature distillation found no BN layer shared by name and shape")
        return torch.stack(terms).mean()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _proxy_loss(logits: Tensor, labels: Tensor, t: float) -> Tensor:
    if labels.dtype == torch.long:
        return F.cross_entropy(logits, labels)
    return _kd(logits, labels, t)


def augment_batch(x: Tensor, gen: torch.Generator, shift: int = 4, flip: bool = True) -> Tensor:
    """Random translation by up to ``shift`` px (reflect padding) and horizontal flip."""
    n, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        oy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N,1,H,1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N,1,1,W)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]  # (N, C, H, W)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def mixup_batch(x: Tensor, gen: torch.Generator, alpha: float) -> Tensor:
    """Each image blended with a random other one of the batch, its own weight drawn from
    Beta(alpha, alpha) and folded to >= 0.5 (the image keeps most of itself); seeded by
    ``gen`` (torch's Beta sampler takes no generator: it runs under a forked global RNG)."""
    n = x.shape[0]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lam = torch.distributions.Beta(alpha, alpha).sample((n,))
    lam = torch.maximum(lam, 1 - lam).to(x.device, x.dtype)[:, None, None, None]
    other = torch.randperm(n, generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[other]


def _set_bn_mode(model: nn.Module, mode: str) -> None:
    model.train()
    if mode == "eval":
        for bn in _bn_layers(model):
            bn.eval()


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    clean: Tensor,
    proxy_images: Tensor | None,
    proxy_labels: Tensor | None,
    config: FinetuneConfig,
    *,
    progress: ProgressFn | None = None,
    stage: str = "finetune",
    refresh: RefreshFn | None = None,
    stamp: StampFn | None = None,
    refresh_stamp: StampRefreshFn | None = None,
    all_to_all_stamp: StampFn | None = None,
    logit_teacher: nn.Module | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (in place) towards ``teacher`` on synthetic data, unlearning proxies.

    Parameters
    ----------
    student : nn.Module
        The compact model; changed in place and left in eval mode with the best epoch's
        weights (by the data-free criterion) when ``early_stopping``.
    teacher : nn.Module
        The original model; not changed (eval mode throughout).
    clean : Tensor
        Synthetic images, normalised space.
    proxy_images, proxy_labels : Tensor or None
        Proxy images and their labels: long class indices (the teacher's prediction on the
        clean source) or float ``(N, C)`` teacher logits on the clean source (distilled).
        ``None`` trains on KD alone.
    refresh : callable, optional
        ``refresh(student, epoch) -> (proxy_images, proxy_labels)`` builds new proxies against
        the current student; called every ``config.refresh_every`` epochs.
    stamp : callable, optional
        ``stamp(images, generator)``: an input-agnostic proxy trigger. A share
        (``stamp_fraction``) of every augmented clean batch is stamped on the fly and
        labelled by the teacher's output on the same clean image (trigger-invariance).
    refresh_stamp : callable, optional
        ``refresh_stamp(student, epoch) -> stamp`` replaces ``stamp`` every
        ``config.refresh_every`` epochs (e.g. the trigger re-inverted on the student).
    all_to_all_stamp : callable, optional
        A second stamp, given half of the stamped images (and of the held-out and
        recalibration ones), with its own batch mode and weight
        (``config.all_to_all_batch``, ``config.all_to_all_weight``); not refreshed.
    logit_teacher : nn.Module, optional
        A second teacher whose logits are mixed into the distillation targets and clean
        labels (``config.logit_teacher_share``); not changed (eval mode throughout).

    Returns
    -------
    FinetuneResult
    """
    if config.bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, not {config.bn_mode!r}")
    if config.proxy_labels not in PROXY_LABELS:
        raise ValueError(f"proxy_labels must be 'hard' or 'soft', not {config.proxy_labels!r}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {config.optimizer!r}")
    if config.logit_teacher_on not in LOGIT_TEACHER_ON:
        raise ValueError(
            f"logit_teacher_on must be one of {LOGIT_TEACHER_ON}, not {config.logit_teacher_on!r}"
        )
    if config.stamped_batch not in STAMPED_BATCHES:
        raise ValueError(
            f"stamped_batch must be one of {STAMPED_BATCHES}, not {config.stamped_batch!r}"
        )
    if config.all_to_all_batch not in (None, *STAMPED_BATCHES):
        raise ValueError(
            f"all_to_all_batch must be None or one of {STAMPED_BATCHES}, "
            f"not {config.all_to_all_batch!r}"
        )
    a2a_batch, a2a_weight = config.all_to_all_settings()
    device = clean.device
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    teacher.eval()
    share = config.logit_teacher_share if logit_teacher is not None else 0.0
    if logit_teacher is not None:
        logit_teacher.eval()

    def targets(teacher_logits: Tensor, images: Tensor) -> Tensor:
        """The distillation targets on ``images``: the teacher's logits, mixed with the
        logit teacher's (``config.logit_teacher_share``)."""
        if share <= 0:
            return teacher_logits
        assert logit_teacher is not None
        with torch.no_grad():
            other = _logits(logit_teacher, images)
            mixed = (1 - share) * teacher_logits + share * other
            if config.logit_teacher_on == "agreed":
                same = (teacher_logits.argmax(1) == other.argmax(1))[:, None]
                mixed = torch.where(same, mixed, teacher_logits)
            return mixed

    def split(n: int) -> tuple[Tensor, Tensor]:
        perm = torch.randperm(n, generator=gen).to(device)
        k = int(round(n * config.holdout)) if config.early_stopping else 0
        k = min(k, n - 1) if n > 1 else 0
        return perm[k:], perm[:k]

    tr_c, ho_c = split(clean.shape[0])
    clean_tr, clean_ho = clean[tr_c], clean[ho_c]
    # the teacher runs on every batch when it is augmented (or its distilled BN outputs on
    # the training images would exceed TEACHER_CACHE_BYTES); otherwise its logits and BN
    # outputs on the fixed training images are computed once, below
    teacher_each_step = config.augment or config.mixup > 0
    t_logits = t_maps = None
    current_stamp = stamp
    stamp_gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)

    def stamp_groups(n: int) -> list[_StampGroup]:
        """Who stamps which of ``n`` images: the first stamp, then the all-to-all one on the
        second half (all ``n`` when only one of them is given)."""
        first = second = None
        if current_stamp is not None:
            first = _StampGroup(current_stamp, 0, n, config.stamped_batch, config.proxy_weight)
        if all_to_all_stamp is not None:
            second = _StampGroup(all_to_all_stamp, 0, n, a2a_batch, a2a_weight)
        if first is None or second is None:
            return [g for g in (first, second) if g is not None]
        cut = n - n // 2
        if cut == n:  # one image: the first stamp's
            return [first]
        return [dataclasses.replace(first, stop=cut), dataclasses.replace(second, start=cut)]

    def stamped(images: Tensor, groups: list[_StampGroup], g: torch.Generator) -> Tensor:
        return torch.cat([grp.stamp(images[grp.start : grp.stop], g) for grp in groups])

    ho_stamped = ho_stamp_labels = None
    if (stamp is not None or all_to_all_stamp is not None) and clean_ho.shape[0]:
        # held-out proxies for the criterion, made once with the first trigger(s)
        ho_gen = torch.Generator(device="cpu").manual_seed(config.seed + 2)
        ho_stamped = stamped(clean_ho, stamp_groups(clean_ho.shape[0]), ho_gen)
        ho_stamp_labels = targets(_logits(teacher, clean_ho), clean_ho).argmax(1)
    has_proxy = proxy_images is not None and proxy_labels is not None
    p_img = p_lab = p_ho = p_ho_lab = None
    if has_proxy:
        assert proxy_images is not None and proxy_labels is not None
        tr_p, ho_p = split(proxy_images.shape[0])
        p_img, p_lab = proxy_images[tr_p], proxy_labels[tr_p]
        p_ho, p_ho_lab = proxy_images[ho_p], proxy_labels[ho_p]
        if p_ho_lab.dtype != torch.long:
            p_ho_lab = p_ho_lab.argmax(1)

    def recal_images() -> Tensor:
        """The clean synthetic images, plus stamped copies of a fixed share of them."""
        if (current_stamp is None and all_to_all_stamp is None) or config.recal_stamped <= 0:
            return clean
        g = torch.Generator(device="cpu").manual_seed(config.seed + 3)
        k = min(clean.shape[0], max(1, int(round(config.recal_stamped * clean.shape[0]))))
        pick = torch.randperm(clean.shape[0], generator=g)[:k].to(device)
        mixed = torch.cat([clean, stamped(clean[pick], stamp_groups(k), g)])
        return mixed[torch.randperm(mixed.shape[0], generator=g).to(device)]

    if config.recalibrate:
        recalibrate_bn(student, recal_images(), batch_size=config.batch_size)

    params = [p for p in student.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=config.lr, weight_decay=config.weight_decay
        )
    else:  # "sgd"
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.epochs, 1))

    steps_per_epoch = max(-(-clean_tr.shape[0] // config.batch_size), 1)
    total = max(config.epochs * steps_per_epoch, 1)
    result = FinetuneResult()

    def evaluate() -> dict[str, float]:
        m: dict[str, float] = {}
        if clean_ho.shape[0] and ho_targets is not None:
            m["agreement"] = float(
                (_logits(student, clean_ho).argmax(1) == ho_targets.argmax(1)).float().mean()
            )
        elif clean_ho.shape[0]:
            m["agreement"] = agreement(student, teacher, clean_ho)
        fixes = []
        if p_ho is not None and p_ho.shape[0]:
            assert p_ho_lab is not None
            fixes.append(float((_logits(student, p_ho).argmax(1) == p_ho_lab).float().mean()))
        if ho_stamped is not None and ho_stamp_labels is not None:
            fixes.append(
                float((_logits(student, ho_stamped).argmax(1) == ho_stamp_labels).float().mean())
            )
        if fixes:
            m["proxy_fix"] = sum(fixes) / len(fixes)
        m["score"] = m.get("agreement", 0.0) + m.get("proxy_fix", 0.0)
        return m

    def settle() -> None:
        if config.final_recalibrate and config.bn_mode == "train":
            recalibrate_bn(student, recal_images(), batch_size=config.batch_size)

    ho_targets = targets(_logits(teacher, clean_ho), clean_ho) if share > 0 else None
    best_state = None
    if config.early_stopping:
        base = evaluate()
        result.history.append({"epoch": 0.0, **base})
        result.best_epoch, result.best_score = 0, base["score"]
        best_state = copy.deepcopy(student.state_dict())
    average = _WeightAverage(student) if config.average_from > 0 else None
    bad = 0
    step = 0
    taps = _BNTaps(student, teacher, config.feature_depth) if config.feature_weight > 0 else None
    try:
        if not teacher_each_step:
            if taps is None:
                t_logits = _logits(teacher, clean_tr)
            elif taps.feature_bytes(teacher, clean_tr) * clean_tr.shape[0] <= TEACHER_CACHE_BYTES:
                t_logits, t_maps = taps.teacher_outputs(teacher, clean_tr, 256)
            else:
                teacher_each_step = True
            if t_logits is not None:
                t_logits = targets(t_logits, clean_tr)
        for epoch in range(1, config.epochs + 1):
            refresh_due = (
                config.refresh_every > 0 and epoch > 1 and (epoch - 1) % config.refresh_every == 0
            )
            if refresh_due and has_proxy and refresh is not None:
                new_img, new_lab = refresh(student, epoch)
                p_img, p_lab = new_img.to(device), new_lab.to(device)
            if refresh_due and refresh_stamp is not None:
                current_stamp = refresh_stamp(student, epoch)
            _set_bn_mode(student, config.bn_mode)
            order = torch.randperm(clean_tr.shape[0], generator=gen).to(device)
            p_order = None
            if p_img is not None:
                p_order = torch.randperm(p_img.shape[0], generator=gen).to(device)
            sums = {"kd": 0.0, "proxy": 0.0, "feature": 0.0}
            for i in range(steps_per_epoch):
                idx = order[i * config.batch_size : (i + 1) * config.batch_size]
                xb = clean_tr[idx]
                if config.augment:
                    xb = augment_batch(xb, gen, config.shift, config.flip)
                if config.mixup > 0:
                    xb = mixup_batch(xb, gen, config.mixup)
                if taps is not None:
                    taps.active = True
                if teacher_each_step:
                    with torch.no_grad():
                        tb = targets(teacher(xb), xb)
                else:
                    assert t_logits is not None
                    tb = t_logits[idx]
                    if taps is not None and t_maps is not None:
                        taps.teacher.update({n: m[idx] for n, m in t_maps.items()})
                n = xb.shape[0]
                groups: list[_StampGroup] = []
                if config.stamp_fraction > 0:
                    groups = stamp_groups(max(1, int(round(config.stamp_fraction * n))))
                # each group's stamped images, then the ones that join the clean batch
                xs = [grp.stamp(xb[grp.start : grp.stop], stamp_gen) for grp in groups]
                in_joint = [x for x, grp in zip(xs, groups, strict=True) if grp.batch != "separate"]
                in_own = [x for x, grp in zip(xs, groups, strict=True) if grp.batch != "joint"]
                out_joint = None
                if in_joint:
                    out = student(torch.cat([xb, *in_joint]))
                    out_clean, out_joint = out[:n], out[n:]
                else:
                    out_clean = student(xb)
                loss = config.kd_weight * _kd(out_clean, tb, config.temperature)
                sums["kd"] += float(loss.detach())
                if taps is not None:
                    taps.active = False
                    fl = config.feature_weight * taps.loss(rows=n)
                    sums["feature"] += float(fl.detach())
                    loss = loss + fl
                if groups:
                    out_own = student(torch.cat(in_own)) if in_own else None
                    sl = _stamped_loss(groups, out_joint, out_own, tb, config)
                    sums["proxy"] += float(sl.detach())
                    loss = loss + sl
                if p_img is not None and p_lab is not None and p_order is not None:
                    np_ = p_img.shape[0]
                    j0 = (i * config.batch_size) % np_
                    pidx = p_order[j0 : j0 + config.batch_size]
                    pl = config.proxy_weight * _proxy_loss(
                        student(p_img[pidx]), p_lab[pidx], config.temperature
                    )
                    sums["proxy"] += float(pl.detach())
                    loss = loss + pl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if progress is not None:
                    progress(stage, step / total)
            sched.step()
            settle()
            record = {
                "epoch": float(epoch),
                "kd": sums["kd"] / steps_per_epoch,
                "proxy": sums["proxy"] / steps_per_epoch,
                "feature": sums["feature"] / steps_per_epoch,
            }
            if config.early_stopping:
                record.update(evaluate())
                if record["score"] > result.best_score + 1e-9:
                    result.best_score, result.best_epoch = record["score"], epoch
                    best_state = copy.deepcopy(student.state_dict())
                    bad = 0
                else:
                    bad += 1
            result.history.append(record)
            if average is not None and epoch >= config.average_from:
                average.add(student)
            if config.early_stopping and bad >= config.patience:
                result.stopped_early = True
                break
    finally:
        if taps is not None:
            taps.close()
    if average is not None and average.count:
        result.averaged_epochs = average.count
        average.load_into(student)
        settle()
        if config.early_stopping:
            result.averaged_score = evaluate()["score"]
            result.averaged = result.averaged_score >= result.best_score
        else:
            result.averaged = True
        if result.averaged:
            best_state = None
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return result


@dataclass(frozen=True)
class _StampGroup:
    """A stamp applied to images ``start:stop`` of a step's stamped share, their batch mode
    (``FinetuneConfig.stamped_batch``) and unlearning weight."""

    stamp: StampFn
    start: int
    stop: int
    batch: str
    weight: float


def _stamped_loss(
    groups: list[_StampGroup],
    out_joint: Tensor | None,
    out_own: Tensor | None,
    teacher_logits: Tensor,
    config: FinetuneConfig,
) -> Tensor:
    """The unlearning loss of a step's stamped images: per group, the mean over the passes it
    went through (the joint batch's tail, its own batch), times its weight and its share of
    the stamped images (the groups cover ``0:groups[-1].stop``). ``out_joint`` /
    ``out_own`` hold the groups in order, each only those of its pass."""
    total: Tensor | None = None
    k = groups[-1].stop
    at_joint = at_own = 0
    for grp in groups:
        size = grp.stop - grp.start
        labels = teacher_logits[grp.start : grp.stop]
        target = labels.argmax(1) if config.proxy_labels == "hard" else labels
        outs = []
        if grp.batch != "separate" and out_joint is not None:
            outs.append(out_joint[at_joint : at_joint + size])
            at_joint += size
        if grp.batch != "joint" and out_own is not None:
            outs.append(out_own[at_own : at_own + size])
            at_own += size
        term = (
            grp.weight
            * torch.stack([_proxy_loss(o, target, config.temperature) for o in outs]).mean()
        )
        if len(groups) > 1:
            term = term * (size / k)
        total = term if total is None else total + term
    assert total is not None
    return total


class _WeightAverage:
    """Running mean of a model's floating-point parameters and buffers (``average_from``)."""

    def __init__(self, model: nn.Module) -> None:
        self.sums = {
            name: torch.zeros_like(value)
            for name, value in model.state_dict().items()
            if value.is_floating_point()
        }
        self.count = 0

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, total in self.sums.items():
            total += state[name]
        self.count += 1

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> None:
        """Put the mean into ``model``; its integer buffers (BN batch counts) stay as they are;
        BN running statistics are to be re-estimated by the caller."""
        state = model.state_dict()
        state.update({name: total / self.count for name, total in self.sums.items()})
        model.load_state_dict(state)
