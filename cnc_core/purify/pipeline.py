"""The purification pipeline: data-free backdoor removal with compression.

``purify(model, PurifyConfig, ...) -> PurifyResult`` runs one of :data:`METHODS`:

``"cnc"``
    The pipeline our measurements chose (``bench/results/explore-purify.md``): ZeroQ synthetic
    images from the original model; Neural-Cleanse trigger inversion on them (the data-free
    detection of the target class); **teacher cleaning**: the original model's channels that
    respond to the inverted trigger far more than to clean synthetic images are zeroed,
    re-inverting between rounds (the synthetic images carry trigger features from the BN
    statistics, so distilling the uncleaned model re-teaches the backdoor), undone when the
    cleaned model no longer agrees with the original on most synthetic images, or when the
    inverted trigger still reaches the target through the cleaned model; where the cleaning
    cut that reach, extra images of the target class drawn from the cleaned model (the
    original's own images of the target carry the trigger); Tucker-2
    compression of the cleaned model, its factors refit to the cleaned model's responses on
    the synthetic images (:mod:`.refit`); suppression of the rank components that respond to
    the inverted trigger (rank-level sensitivity); BN recalibration on the synthetic images;
    fine-tuning by distillation from the cleaned model on clean synthetic images plus
    unlearning on the inverted trigger stamped on the fly, labelled with the clean prediction,
    BN statistics re-estimated on clean + stamped images after every epoch.
``"cnc-paper"``
    The straightforward reading of Phan et al. (ECCV 2024): ZeroQ data, per-sample PGD
    proxies, compression with spectrum scaling, KD + adversarial CE with BN in train mode.
``"clp"``
    The CLP baseline (Zheng et al., ECCV 2022), optionally followed by the same compression.
``"compress"``
    Compression only.

Every stage reports progress through one :class:`~cnc_core.progress.StagePlan` and honours
cancellation. The input model is never changed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnc_core.compress import CompressConfig, CompressResult, compress, compressible_layers
from cnc_core.limits import check_knob
from cnc_core.progress import ProgressFn, StagePlan
from cnc_core.purify.calibrate import (
    logits_of,
    mean_softmax,
    refit_to_prior,
    shift_to_prior,
)
from cnc_core.purify.clp import CLPConfig, CLPResult, clp
from cnc_core.purify.dynamic import (
    DynamicInversionConfig,
    DynamicInversionResult,
    dynamic_inversion,
    dynamic_stamp,
)
from cnc_core.purify.finetune import (
    BN_MODES,
    LOGIT_TEACHER_ON,
    OPTIMIZERS,
    PROXY_LABELS,
    STAMPED_BATCHES,
    FinetuneConfig,
    FinetuneResult,
    StampFn,
    StampRefreshFn,
    agreement,
    finetune,
    recalibrate_bn,
)
from cnc_core.purify.permutation import (
    INFORMATION,
    PermutationInversionConfig,
    PermutationInversionResult,
    permutation_inversion,
)
from cnc_core.purify.proxies import (
    INVERSION_USES,
    PROXY_KINDS,
    PGDConfig,
    ProxyConfig,
    ProxySet,
    TriggerInversionConfig,
    adversarial_histogram,
    apply_trigger,
    blend_triggers,
    chosen_triggers,
    class_histogram,
    make_proxies,
    mean_difference_pattern,
    mixed_stamp,
    perturbation_stamp,
    predict,
    trigger_inversion,
    trigger_stamp,
)
from cnc_core.purify.refit import (
    REFIT_WEIGHTINGS,
    RefitConfig,
    activation_spectra,
    layer_moments,
    refit_compact,
)
from cnc_core.purify.sensitivity import (
    SENSITIVITY_ACTIONS,
    SensitivityConfig,
    SensitivityResult,
    apply_suppression,
    strongest_first,
    suppress_sensitive_ranks,
)
from cnc_core.purify.synthesis import SynthesisConfig, cpu_channels_last, synthesize
from cnc_core.purify.verify import VerifyConfig, residual_check
from cnc_core.purify.warp import WarpInversionConfig, apply_warp, warp_inversion, warp_stamp

__all__ = [
    "ALLOCATION_SPECTRA",
    "KNOBS",
    "KNOB_CHOICES",
    "NULLABLE_CHOICES",
    "METHODS",
    "METHOD_COMPRESS_DEFAULTS",
    "PurifyConfig",
    "PurifyResult",
    "purify",
]

METHODS = ("cnc", "cnc-paper", "clp", "compress")

#: ``PurifyConfig.allocation_spectra``: what the rank allocator reads per layer.
ALLOCATION_SPECTRA = ("weight", "response")

#: Compression settings a method uses unless the caller sets them (job, CLI, benchmarks).
#: ``cnc``: a global threshold on the normalised *response* spectra (see
#: ``PurifyConfig.allocation_spectra``), layers with < 10% of the largest layer's weights kept
#: dense. Right after compression + refit + BN recalibration at 3x (BadNet all-to-one, 2,000
#: real test images, no fine-tuning) this keeps 86.45% ACC where one keep ratio for every
#: layer keeps 72.60%; after 6 epochs of distillation 89.95% against 84.35%
#: (``bench/explore_alloc.py``, explore-purify.md 4m).
METHOD_COMPRESS_DEFAULTS: dict[str, dict[str, Any]] = {
    "cnc": {"allocation": "threshold", "min_layer_share": 0.1},
}

#: Teacher cleaning chosen by measurement (explore-purify.md): outliers at 3 MADs, at most
#: 10% of a layer's channels, plain conv channels included.
BLEND_PROXIES = ("none", "mean_diff", "noise", "both")  # PurifyConfig.blend_proxy
CLEANING = SensitivityConfig(u=3.0, max_fraction=0.1, include_dense=True)
DYNAMIC = DynamicInversionConfig()
#: The warp search's settings (``warp=true`` switches it on with these).
WARP = WarpInversionConfig()
WARP_USES = ("finetune", "cleaning", "both")  # PurifyConfig.warp_use
MISNAMED_INVERTED = ("keep", "drop", "warp")  # PurifyConfig.misnamed_inverted
PRIOR_REFERENCES = ("cleaned", "original")  # PurifyConfig.prior_reference
#: The preset's permutation search: six learned-mask restarts of 6 images per class a step
#: (the work of three of 12; session 17, explore-purify.md 4v: on BadNet all-to-all's seed-1
#: images 18 of 24 restarts found the trigger against 7 of 12, and every search did) and
#: one whole-image blend (session 15, 4t).
# Neural Cleanse in the cnc preset: on the original (the proxies) and on the purified model
INVERSION = TriggerInversionConfig(steps=60, images_per_class=16)
PERMUTATION = PermutationInversionConfig(restarts=6, images_per_class=6, blend_restarts=1)


@dataclass(frozen=True)
class PurifyConfig:
    """Everything ``purify`` needs. Build presets with :meth:`for_method`."""

    method: str = "cnc"
    compress: CompressConfig = field(default_factory=CompressConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sensitivity: SensitivityConfig | None = field(default_factory=SensitivityConfig)
    # Teacher cleaning: before compressing, prune the ORIGINAL model's channels that respond
    # to the inverted trigger far more than to clean synthetic images (Neural-Cleanse-style
    # neuron pruning driven by synthetic proxies), re-inverting the trigger between rounds.
    # Both the compression and the distillation then start from the cleaned model, so KD on
    # synthetic images (which carry trigger features from the BN statistics) cannot teach the
    # backdoor back. Needs trigger-inversion proxies (skipped for other kinds). None disables.
    teacher_cleaning: SensitivityConfig | None = None
    cleaning_rounds: int = 1
    # Data-free guard: a cleaning round is undone (and cleaning stops) when the cleaned model
    # agrees with the original on fewer than this share of the clean synthetic images. Cleaning
    # with a wrongly named target collapsed WaNet's model to one class (agreement 0.31, against
    # 0.76 for a correct BadNet cleaning; explore-purify.md section 4g); with 2,048 synthetic
    # images it collapsed just as hard at 0.506, so the bar sits at 0.65, below every correct
    # cleaning measured (0.70-0.92) and above both collapses (section 4h).
    cleaning_min_agreement: float = 0.65
    # Where a round fails that bar and its target is named with evidence (Neural Cleanse's
    # anomaly index past its threshold, a warp past its gate, or the original's share),
    # keep instead the longest part of it (its components strongest outlier first) that
    # still meets it, and let the other guards judge that trimmed round. A round prunes at
    # least one component of every layer with an outlier, a larger share of a narrow model:
    # at width 8 every round of the w16-tuned preset was undone (BadNet all-to-one: 23
    # components, agreement 0.54, though the trigger's reach fell 0.99 -> 0.33;
    # explore-purify.md 4ag). On a class nothing names (a clean model's natural class) the
    # trimmed round only costs accuracy. False: the whole round is undone.
    cleaning_backoff: bool = False
    # Optional second guard (off): a cleaning round is undone (and cleaning stops) unless the
    # trigger re-inverted on the cleaned model needs a mask at least this many times larger
    # (L1) than before the round. Measured (session 9, explore-purify.md 4n): BadNet
    # all-to-one 45.3 -> 117.1 (2.6x; teacher ASR 100 -> 3.6); Blended all-to-one 1.03x
    # (teacher ASR stays 100; undoing the cleaning gave its student +1.8 ACC at 3x). But
    # InputAware all-to-one also grows only 1.03x (136.8 -> 140.9) while its cleaning is
    # what removes the backdoor: undone, 3x ASR 1.76% -> 54.07%. The mask cannot tell the
    # two apart, so the preset leaves it off. None disables.
    cleaning_min_mask_growth: float | None = None
    # Third guard (the cnc preset sets 0.8): a cleaning round is undone (and cleaning stops)
    # when the cleaned model still sends more than this share of the round's trigger-stamped
    # images (those whose clean source the original does not assign to the target) to the
    # target: the pruning did not take the trigger's path, only some clean function. Every
    # round records both shares (``flip_before``, ``flip_after``). Measured (section 4o):
    # BadNet 0.99 -> 0.08, InputAware 0.95 -> 0.56 (both cleanings remove the backdoor),
    # Blended 0.92 -> 0.75 (the cleaned teacher's ASR stays 99.95%). On another host's
    # synthetic images InputAware's cleaning left 0.74 (section 4w), so the bar went from
    # 0.65 to 0.8. None disables.
    cleaning_max_flip: float | None = None
    # Fourth guard: a cleaning round is undone (and cleaning stops) unless it cut the
    # trigger's reach (``flip_before`` -> ``flip_after``) by at least this share of what it
    # was. ``cleaning_max_flip`` cannot see an all-to-all model, where Neural Cleanse's
    # trigger reaches only 0.5-0.6 of the images before any pruning; there a round that
    # leaves the reach where it was (session 13, seed 0: BadNet all-to-all 0.57 -> 0.53,
    # InputAware all-to-all 0.51 -> 0.50) looks as if it has pruned clean function only.
    # Measured, not adopted (explore-purify.md 4r, 3x): undoing those two rounds (what a cut
    # of 0.25 does there; ``cleaning=false`` gives the same model) costs ASR on both, BadNet
    # all-to-all 85.60 / 13.70 -> 86.70 / 17.50, InputAware all-to-all 87.50 / 1.80 -> 88.05 /
    # 4.95: the pruning helps the student even where the trigger's reach hardly moves.
    # None disables.
    cleaning_min_reach_cut: float | None = None
    # Where an all-to-all trigger (the permutation or the dynamic one) passed its gate, clean
    # with it alone instead of the inverted per-class triggers (Neural Cleanse's "target" is
    # meaningless there): channels scored on images stamped with it, the reach counted as the
    # share of them sent to their class's image under the trigger's mapping. No target-class
    # images follow such a cleaning (there is no one target). Measured, not adopted (section
    # 4p, 3x): BadNet all-to-all 84.95 / 19.15 -> 84.20 / 15.85, InputAware all-to-all
    # 86.20 / 1.85 -> 83.80 / 10.95.
    cleaning_all_to_all: bool = False
    # Keep the inverted per-class triggers (and the teacher cleaning by them) beside an
    # all-to-all trigger that passed its gate. False: the all-to-all trigger alone is
    # stamped, and the teacher is not cleaned (Neural Cleanse's "target" on an all-to-all
    # model is a natural class, and unlearning or pruning it costs that class). Measured, not
    # adopted (section 4p, 3x): BadNet all-to-all 84.95 / 19.15 -> 88.15 / 20.30, InputAware
    # all-to-all 86.20 / 1.85 -> 88.05 / 4.60.
    inverted_beside_all_to_all: bool = True
    clp: CLPConfig = field(default_factory=CLPConfig)
    clp_compress: bool = True  # "clp": also apply the same compression afterwards
    # Activation-aware refit of the compact model's factors (same ranks) to the compressed
    # model's responses on the synthetic images, before recalibration (:mod:`.refit`);
    # None keeps the plain truncated factors.
    refit: RefitConfig | None = None
    # Permutation trigger inversion (:mod:`.permutation`), a proxy for all-to-all backdoors
    # that Neural Cleanse cannot name. Its trigger is stamped beside the inverted one(s) (each
    # stamped image gets one at random) in the proxies, unlearning and BN statistics when it
    # moves at least ``permutation_min_flip`` of the synthetic images away from their class
    # AND its class mapping (most common new class per class) reaches at least
    # ``permutation_min_targets`` of the classes: a permutation, not a collapse onto one or
    # two attractor classes. Measured (explore-purify.md 4l): BadNet all-to-all maps onto all
    # 10 classes (8 on a 512-image probe); a clean model onto 4, InputAware all-to-all onto 3,
    # BadNet all-to-one and Blended all-to-all onto 2. The cnc preset sets 0.5 (session 15,
    # 4t): the whole-image blend restart maps Blended all-to-all onto 5-7 classes, a clean
    # model onto 2, BadNet and InputAware all-to-all onto 4 (a one-class margin). None
    # disables.
    permutation: PermutationInversionConfig | None = None
    permutation_min_flip: float = 0.3
    permutation_min_targets: float = 0.6
    # Gate every restart of the search, not only the one with the best objective, and take
    # the best-objective restart that passes. The objective also rewards images that stay
    # put, so it can rank a collapse onto natural classes above a real permutation that
    # another restart found (session 12, explore-purify.md 4q: BadNet all-to-all, seed 1).
    # The cnc preset sets it.
    permutation_any_restart: bool = False
    # With ``permutation_any_restart``: stamp the trigger of every restart that passes the
    # gate, not only the best one's. Restarts that find the same mapping reach it with
    # different masks and patterns, each an approximation of the real trigger; unlearning all
    # of them covers more of its neighbourhood (each stamped image gets one trigger at random,
    # so the all-to-all triggers also take a larger share of the stamped images).
    permutation_all_passing: bool = False
    # Where the permutation trigger in use is the whole-image blend restart's
    # (``PermutationInversionConfig.blend_restarts``), fine-tuning unlearns it apart from the
    # inverted triggers (half the stamped images), in this BN batch mode and at this weight,
    # as ``FinetuneConfig.all_to_all_batch`` / ``all_to_all_weight`` do for any all-to-all
    # trigger (these two win over those there); None leaves that setting as it is. A blend
    # trigger is a whole-image pattern that no learned-mask restart could match, so the rule
    # reaches only the models the blend restart detects (Blended all-to-all on the zoo), and
    # leaves a patch (BadNet) or warp (WaNet) all-to-all trigger, found by a learned mask, as
    # before.
    permutation_blend_batch: str | None = None
    permutation_blend_weight: float | None = None
    # Likewise where the permutation trigger in use is a learned mask concentrated in a patch:
    # at least ``permutation_patch_peak`` of its mass in its densest square of an eighth of
    # the image side (:func:`.permutation.mask_peak_share`; the masks used on BadNet
    # all-to-all, a 3x3 patch, hold 0.33-0.57 there, WaNet all-to-all's 0.11-0.14). A warp
    # trigger (WaNet) stays with the inverted triggers: split off, its backdoor came back
    # (session 15, explore-purify.md 4t).
    permutation_patch_peak: float = 0.25
    permutation_patch_batch: str | None = None
    permutation_patch_weight: float | None = None
    # The search is skipped when Neural Cleanse already names one target with this anomaly
    # index or more (an all-to-one backdoor; None: always search). Measured anomaly indices:
    # BadNet all-to-one 2.75-4.41, Blended all-to-one 1.6-4.19 (and the permutation trigger
    # was gated out on both); every all-to-all model 0.76-2.11 (explore-purify.md 4m).
    # Saves the stage (58 s at 2 threads on a 2-core EPYC) where it cannot be used.
    permutation_max_anomaly: float | None = 2.5
    # Skip the searches on that anomaly index only where the original's share
    # (``prior_name_share``) names Neural Cleanse's class too: an all-to-one target draws
    # the synthetic images, a class an all-to-all trigger happens to reach cheaply does not.
    # BadNet all-to-all at width 8 passed the 2.5 bar (class 8 at 4.24, its share 0.12), so
    # the all-to-all searches never ran and 70% ASR stayed (explore-purify.md 4af, 4ag).
    # False: the anomaly index alone decides.
    all_to_one_needs_share: bool = False
    # Dynamic permutation trigger (:mod:`.dynamic`): where the one-pattern search above found
    # no permutation (searched and gated out) or only a blend restart's (which it then
    # replaces past its own gate, session 18), a small conv generator of per-image triggers
    # is inverted with the same objective plus a spread term, and stamped beside the inverted
    # triggers when it moves at least ``dynamic_min_flip`` of the synthetic images and maps
    # onto at least ``dynamic_min_targets`` of the classes. For input-aware all-to-all
    # backdoors, whose trigger differs per image. The gate is stricter than the one-pattern
    # search's because a generator also finds natural per-image perturbations (512-image
    # probe, explore-purify.md 4p: InputAware all-to-all moved 0.79 onto all 10 classes, the
    # y + 1 mapping; a clean model 0.49 onto 6, Blended all-to-one 0.36 onto 6). None disables.
    dynamic: DynamicInversionConfig | None = None
    dynamic_min_flip: float = 0.6
    dynamic_min_targets: float = 0.8
    # Warp trigger (:mod:`.warp`): where Neural Cleanse named no all-to-one target
    # (``permutation_max_anomaly``, the all-to-all searches' rule), one bounded smooth
    # sub-pixel warp per class is inverted, and the furthest-reaching one is stamped beside
    # the inverted triggers when it sends at least ``warp_min_reach`` of the synthetic
    # images of other classes to its class. For warping triggers (WaNet), which no mask +
    # pattern reproduces. None disables.
    warp: WarpInversionConfig | None = None
    warp_min_reach: float = 0.8
    # Where the warp is used (and no blend or patch permutation trigger is unlearnt apart),
    # fine-tuning unlearns it apart from the inverted triggers in this BN batch mode and at
    # this weight, as ``permutation_blend_*`` does a blend. None, None: beside them.
    warp_batch: str | None = None
    warp_weight: float | None = None
    # What a warp past its gate is used for: "finetune" (unlearnt beside or apart from the
    # inverted triggers, as above), "cleaning" (it drives the teacher cleaning in place of
    # the inverted trigger, with its class as the target: the pruned channels are the ones
    # the warped images move, and the target-class images follow its class; fine-tuning
    # unlearns the inverted triggers only), or "both". Neural Cleanse names the wrong class
    # on WaNet all-to-one (6 where the target is 0) and its cleaning is undone, while the
    # warp names the target (explore-purify.md 4w).
    warp_use: str = "finetune"
    # The outlier bar (MADs) of a cleaning the warp drives, in place of the cleaning's own
    # ``u`` (None: the same). WaNet all-to-one 3x, 2,000 test images (explore-purify.md 4z):
    # u = 3 pruned 29 channels (agreement 0.82) for 84.95 / 3.90, u = 4 pruned 9 (0.92) for
    # 86.55 / 3.15, both with the last epoch kept.
    warp_cleaning_u: float | None = None
    # Search for a warp even where the dynamic all-to-all trigger passed its gate: a model
    # with two backdoors, one input-aware all-to-all and one warping all-to-one. Off, the
    # search is skipped there (see _warp_unused).
    warp_beside_all_to_all: bool = False
    # A warp past its gate drives the cleaning (``warp_use`` "cleaning" / "both") only where
    # it names another class than Neural Cleanse: the rule is for WaNet all-to-one, where
    # Neural Cleanse misnames the target. Where both name one class, the inverted trigger
    # keeps the cleaning (Blended all-to-one, session 23: the warp-driven round pruned 1
    # channel and was undone; without the warp the inverted round held, 16 channels,
    # explore-purify.md 4ab), and under "cleaning" the warp is then not used.
    warp_cleaning_other_class: bool = False
    # Neural Cleanse's inverted trigger where a warp past its gate names another class and
    # drives the cleaning (its class then a natural one, misnamed): "keep" (unlearnt, its
    # images in the stamped BN statistics, as before), "drop" (left out of every stamp;
    # where nothing else was found, fine-tuning unlearns nothing and the rank sensitivity
    # is skipped) or "warp" (the warp unlearnt in its place). WaNet all-to-one 3x, 2,000
    # test images (session 25, explore-purify.md 4ad): keep 85.45 / 1.85, drop 83.35 /
    # 1.85, warp 60.75 / 0.15 (collapsed).
    misnamed_inverted: str = "keep"
    # Class-prior correction after fine-tuning (:mod:`.calibrate`): this many fixed-point
    # steps shift the student's classifier biases until its mean predicted class
    # distribution on the clean synthetic images matches the reference teacher's
    # ("cleaned": the teacher it distilled from; "original"), each class's shift at most
    # ``prior_max_shift`` logits. 0: off. The removal makes the student avoid the suspected
    # target class, on a clean model a natural class (explore-purify.md 4aa).
    prior_correction: int = 0
    # Where set, the avoided classes' classifier rows are refit to the reference teacher's
    # logits on the synthetic images (ridge regression at this relative strength, toward
    # the current rows) in place of the bias shift (calibrate.refit_to_prior); the other
    # prior_* settings choose the classes as for the shift. None: the bias shift. Session
    # 25 (explore-purify.md 4ad), ridge 0.1 against the shift on the same students: clean
    # model +0.35, WaNet all-to-one -3.05 / -4.73 (3x / 4x), Blended all-to-all -0.45 /
    # -0.64, BadNet all-to-all 4x -0.41.
    prior_head_ridge: float | None = None
    # Where set and no class is named as the target (``prior_spare_named``,
    # ``prior_name_share``), the avoided classes' rows (avoided against the ORIGINAL's
    # share) are refit to the original model's logits at this ridge instead, whatever
    # ``prior_reference`` and ``prior_head_ridge`` say; where a class is named, they decide.
    # The original's logits carry an all-to-one trigger back through the target's row
    # (InputAware all-to-one, nothing named: 1.87 -> 17.80% ASR), so only where no target
    # was named; the cleaned teacher's are damaged by the cleaning on a natural class (a
    # clean model's class 6, explore-purify.md 4ad-4ae).
    prior_unnamed_ridge: float | None = None
    # Name as the target, beside the searches, any class to which the ORIGINAL model gives
    # more than this multiple of the uniform share (1 / classes) of its mean softmax mass on
    # the clean synthetic images. None: no class named so. Zoo models (10 classes, two
    # synthetic seeds; bench/original_shares.py): every all-to-one target 0.200-0.233,
    # every class of the clean and all-to-all models at most 0.148 (explore-purify.md 4ae);
    # a width-8 zoo of another training seed, not fitted on: targets 0.194-0.253, one
    # all-to-all model's class 6 at 0.161, the clean model at most 0.126 (4af). A class
    # named wrongly only keeps the bias-shift rule; a target missed gets its row refit to
    # the original's logits, so the bar sits nearer the natural classes.
    prior_name_share: float | None = None
    # Where Neural Cleanse is unsure (its anomaly index under the inversion's
    # ``anomaly_threshold``), that share rule names exactly one class, not Neural
    # Cleanse's, and no warp passed its gate, the share's class becomes the suspected target
    # after the searches: its inverted trigger is stamped on the proxies and drives the
    # teacher cleaning and the unlearning. NC's unsure pick is a natural class where the
    # share names the real target (InputAware all-to-one at width 8: NC 6 at anomaly 0.98,
    # share 0 at 0.24). A warp past its gate is the stronger evidence (WaNet all-to-one at
    # width 16, NC 6, share and warp 0: steered all the same, 86.95 / 1.90 -> 52.30 /
    # 62.75; explore-purify.md 4ag). Needs ``prior_name_share``.
    share_steers_inversion: bool = False
    prior_reference: str = "cleaned"
    prior_max_shift: float = 3.0
    # Shift only the classes the student avoids: given less than this fraction of the
    # reference's share on the synthetic images (None: every class).
    prior_avoided_below: float | None = None
    # Leave out of the correction the classes a search named as the backdoor target with
    # evidence: Neural Cleanse's class where its anomaly index is at least this, and the
    # class of a warp past its gate. None: none left out. Correcting the target lets the backdoor
    # back (Blended all-to-one, anomaly index 2.36: 84.35 / 2.00 -> 86.40 / 9.40); the
    # corrections that helped were of classes at anomaly index 0.67-0.99 (4ab).
    prior_spare_named: float | None = None
    # What the rank allocator reads per layer: "weight", the singular values of the weights
    # (``compress`` alone), or "response", the spectra of the layer's responses on the
    # synthetic images in the refit's metric (:func:`.refit.activation_spectra`), so the
    # budget goes where the responses need it (explore-purify.md 4m).
    allocation_spectra: str = "weight"
    # Leave out of fine-tuning the synthetic images the original model assigns to the
    # suspected target and the cleaned teacher does not. The removal's accuracy cost sits in
    # the target class (BadNet all-to-one 3x: target recall 88.5 -> 53.5 on 2,000 test
    # images): pruning took some of the target's clean features, and distilling the cleaned
    # teacher's other labels on those images teaches the student to avoid the target.
    # Dropped (about 11% of the images on BadNet), 3x 87.45 / 1.75 -> 88.60 / 2.25 and 4x
    # 87.50 / 2.50 -> 88.50 / 2.50 (ACC / ASR; recall 53.5 -> 67.5 and 59.0 -> 69.5;
    # explore-purify.md 4n). Off in the preset: on InputAware all-to-one it let the backdoor
    # back, 88.70 / 2.20 -> 88.20 / 5.70. No effect where cleaning was undone.
    drop_disputed: bool = False
    # Target-class synthesis: after a cleaning round held, synthesise this many extra images
    # of the suspected target from the CLEANED model (ZeroQ with a cross-entropy term of
    # weight ``target_class_weight`` towards the target) and add them to the fine-tuning set.
    # The original model's own synthetic images of the target carry the trigger's features
    # (the easiest way to make a backdoored model say "target"), so the cleaned teacher
    # relabels most of them (BadNet: 193 -> 80 images) and the student never sees a clean
    # example of the target class; the cleaned model, no longer moved by the trigger, has to
    # draw the class's own features. Only where the cleaning took the stamped trigger's reach
    # down to ``target_max_flip`` (the last held round's ``flip_after``): a cleaned model the
    # trigger still moves draws it again. 0 disables.
    target_images: int = 0
    target_class_weight: float = 1.0
    target_max_flip: float = 0.3
    recalibrate: bool = True  # recalibrate BN on synthetic images after compression
    refresh_every: int = 0  # re-invert / re-attack on the student every k epochs (0: never)
    # Input-agnostic proxies (inverted trigger, universal perturbation) are stamped on the
    # fly on each clean training batch instead of training on a fixed set of proxy images.
    online_proxies: bool = True
    # Blend proxies stamped beside the inverted trigger during fine-tuning (half the stamped
    # images each): "mean_diff" blends the mean-difference pattern of the synthetic images the
    # model assigns to the suspected target (:func:`mean_difference_pattern`), "noise" blends
    # ``blend_noise`` seeded uniform-noise patterns, "both" does both, "none" neither. A
    # Neural-Cleanse mask is a poor proxy for a whole-image blend (explore-purify.md 4i).
    blend_proxy: str = "none"
    blend_alpha: float = 0.2
    blend_noise: int = 8
    detect: bool = True  # PGD class histogram before and after (the detection signal)
    # Data-free check of the purified model (:mod:`.verify`): Neural Cleanse re-run on it;
    # a class that was its outlier on the original and whose mask has not grown against the
    # other classes' is reported ("removal unconfirmed"). It reads the model and changes
    # nothing. None: not run.
    verify: VerifyConfig | None = None
    detect_images: int = 256
    detect_pgd: PGDConfig = field(default_factory=lambda: PGDConfig(eps=8 / 255, steps=10))
    seed: int = 0

    @classmethod
    def for_method(
        cls, method: str = "cnc", compress: CompressConfig | None = None, seed: int = 0
    ) -> PurifyConfig:
        """The preset of ``method`` (defaults chosen by measurement, see the module doc)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        cc = compress or CompressConfig(**METHOD_COMPRESS_DEFAULTS.get(method, {}))
        # 1,024 images, 100 Adam steps in batches of 256: ~2 min on 2 idle CPU cores for a
        # width-16 ResNet-18 (0.33 s a step); batches of 256 cost ~1.2x batches of 128 a step
        synth = SynthesisConfig(num_images=1024, batch_size=256, iterations=100, seed=seed)
        if method == "cnc-paper":
            return cls(
                method=method,
                compress=cc,
                synthesis=synth,
                proxy=ProxyConfig(kind="pgd", pgd=PGDConfig(eps=8 / 255, steps=10), seed=seed),
                finetune=FinetuneConfig(
                    epochs=10,
                    lr=1e-3,
                    bn_mode="train",
                    early_stopping=False,
                    augment=False,
                    seed=seed,
                ),
                sensitivity=None,
                seed=seed,
            )
        return cls(
            method=method,
            compress=cc,
            synthesis=synth,
            proxy=ProxyConfig(
                kind="trigger_inversion",
                inversion=INVERSION,
                seed=seed,
            ),
            # BN in train mode (frozen BN diverged, explore-purify.md section 3), no
            # augmentation; distillation of every BN output besides the logits (+10 ACC
            # points at 3x, section 4e); 15 epochs (30 until session 8: with the response
            # allocation the student starts closer, BadNet 3x 85.95 / 1.2 in 30 epochs and
            # 85.05 / 0.9 in 15, best epochs 12 and 6, at half the fine-tuning time, 4m), the
            # best by the data-free criterion restored (too noisy to stop on: patience 5
            # stopped at epoch 8-13). Keeping the
            # last epoch instead raised ACC where the trigger was misnamed (WaNet 72.8 vs
            # 61.5) but let feature distillation re-implant blends (Blended ASR 90.5 vs
            # 75.75, all-to-all 47.8 vs 38.9; section 4g): removal comes first
            # BN statistics re-estimated on clean + trigger-stamped images: with clean-only
            # statistics the unlearnt blend trigger fired again (Blended 3x ASR 62-77% ->
            # 2.3%, section 4k)
            finetune=FinetuneConfig(
                epochs=15,
                lr=1e-3,
                bn_mode="train",
                patience=15,
                feature_weight=30.0,
                proxy_weight=2.0,
                recal_stamped=1.0,
                seed=seed,
            ),
            sensitivity=SensitivityConfig(),
            teacher_cleaning=CLEANING,
            # session 10 (section 4o, 2,000 test images, 3x): a cleaning after which the
            # inverted trigger still reaches the target on > 65% of the stamped images was
            # undone (Blended all-to-one 0.92 -> 0.75, teacher ASR stays 99.95: 82.15 / 0.95
            # -> 84.75 / 1.45; BadNet 0.99 -> 0.08 and InputAware 0.96 -> 0.54 kept). Session
            # 18 (section 4w, a 2-core EPYC): InputAware's cleaning left 0.74 there and was
            # undone (88.00 / 52.65; at 0.8, 87.50 / 1.65), Blended's 0.79 (84.40 / 2.25; at
            # 0.8 kept, 83.50 / 1.80). The bar is 0.8: removal first ...
            cleaning_max_flip=0.8,
            # ... and where the cleaning took that reach to <= 30%, 256 images of the target
            # drawn from the cleaned teacher join fine-tuning (BadNet all-to-one: target
            # recall 44.0 -> 74.0, 85.85 / 1.10 -> 89.10 / 3.90; on InputAware, where the
            # reach stays 0.54, they cost 2.35 ACC and are gated out)
            target_images=256,
            # factors refit to the cleaned model's responses on the synthetic images: +3 to
            # +11 ACC points at 3x / 4x (section 4k)
            refit=RefitConfig(),
            # the all-to-all proxy, stamped only when it passes its gate: BadNet all-to-all
            # 3x 74.90 / 72.25 -> 79.95 / 15.75; gated out on the all-to-one and Blended
            # all-to-all models measured (section 4l). Three restarts, each gated (session
            # 12, section 4q): BadNet all-to-all seed 1, 83.55 / 77.10 -> 84.50 / 10.40
            permutation=PERMUTATION,
            permutation_any_restart=True,
            # ... plus one restart whose mask is a whole-image blend at alpha 0.2, gated onto
            # >= 5 of 10 classes (session 15, section 4t): Blended all-to-all, where no
            # learned-mask restart passes, 82.50 / 25.50 -> 83.90 / 9.55 (seed 1: 84.30 /
            # 34.05 -> 83.45 / 20.70)
            permutation_min_targets=0.5,
            # ... and where that blend trigger is the one used, it is unlearnt apart, in one
            # BN batch with the clean images and at weight 16 (session 16, section 4u;
            # Blended all-to-all, two seeds: 83.50 / 10.55 -> 85.40 / 3.50 and 83.55 /
            # 15.10 -> 82.00 / 6.30); no other zoo model uses a blend trigger
            permutation_blend_batch="joint",
            permutation_blend_weight=16.0,
            # ... and where it is a learned mask gathered in a patch, apart at weight 16
            # (session 17, section 4v; BadNet all-to-all, two seeds: 84.20 / 11.55 ->
            # 85.70 / 2.10 and 86.90 / 22.35 -> 85.80 / 3.85; weight 4 and 8 removed less)
            permutation_patch_weight=16.0,
            # ... and where it finds none, a generator of per-image triggers, stamped past
            # its gate: InputAware all-to-all 3x 86.20 / 1.85 (section 4p)
            dynamic=DYNAMIC,
            # ... and a warp per class: where one sends >= 80% of the synthetic images to
            # its class, it drives the teacher cleaning in place of the inverted trigger, at
            # 4 MADs (session 21, section 4z: WaNet all-to-one 3x, whose target Neural
            # Cleanse misnames, 87.10 / 6.05 -> 86.55 / 3.15; seed 1 unchanged, 87.05 /
            # 2.50, its round undone; at u = 3 seed 1 collapsed, 71.50 / 33.10; every other
            # zoo model's best warp reaches 0.06-0.62 of the images)
            warp=WARP,
            warp_use="cleaning",
            warp_cleaning_u=4.0,
            # ... where it names another class than Neural Cleanse (session 24)
            warp_cleaning_other_class=True,
            # the classes the removal made the student avoid (under 0.6 of the cleaned
            # teacher's share on the synthetic images) get their bias back: a clean model's
            # class 6 (Neural Cleanse's natural "target") 82.95 -> 84.85, Blended
            # all-to-all 81.65 / 2.90 -> 82.75 / 2.80, WaNet all-to-one seed 2 80.25 / 1.65
            # -> 82.50 / 1.25; BadNet all-to-one untouched (explore-purify.md 4aa)
            prior_correction=10,
            prior_avoided_below=0.6,
            # ... but never a class named as the target with an anomaly index >= 2 or by a
            # warp past its gate (Blended all-to-one 86.05 / 12.13 -> 84.25 / 2.51), and by
            # at most 1.5 logits: over the eight backdoored models the mean ACC drop 4.96 ->
            # 4.68 at 3x, 6.37 -> 5.97 at 4x (WaNet all-to-one 83.06 -> 85.36), mean ASR
            # 3.01 -> 3.12 and 3.55 -> 3.67; a clean model gives back 0.25 and 0.85 of its
            # 1.6 and 2.7 points (session 24, explore-purify.md 4ac)
            prior_spare_named=2.0,
            prior_max_shift=1.5,
            # ... and where no search names a target and the original gives no class more
            # than 1.5x the uniform share of the synthetic images, the avoided rows are
            # refit to the original's logits (session 27, explore-purify.md 4af)
            prior_name_share=1.5,
            prior_unnamed_ridge=0.1,
            # session 28 (explore-purify.md 4ag, a width-8 zoo, 3x, 2,000 test images): a
            # cleaning round below the agreement bar, on a target named with evidence,
            # trimmed to its strongest part that meets it (BadNet all-to-one 78.95 / 17.90
            # -> 81.35 / 4.10) ...
            cleaning_backoff=True,
            # ... and where Neural Cleanse is unsure and the share names one other class, no
            # warp past its gate, the share's class is the suspected target (InputAware
            # all-to-one 81.85 / 97.50 -> 81.20 / 8.00). No width-16 row is touched: every
            # round there kept >= 0.81 agreement, and the one model whose share and Neural
            # Cleanse disagree (WaNet all-to-one) has a warp past its gate
            share_steers_inversion=True,
            # the purified model checked for a class a tiny trigger still reaches (session
            # 29, explore-purify.md 4ah); it reads the model only
            verify=VerifyConfig(inversion=INVERSION),
            # ranks allocated on the response spectra (with the method's compression
            # defaults, METHOD_COMPRESS_DEFAULTS): 72.60 -> 86.45 ACC right after refit (4m)
            allocation_spectra="response",
            seed=seed,
        )

    @classmethod
    def from_knobs(
        cls,
        *,
        method: str = "cnc",
        compress: CompressConfig | None = None,
        seed: int = 0,
        knobs: dict[str, Any] | None = None,
    ) -> PurifyConfig:
        """The preset of ``method`` with flat ``knobs`` (names in :data:`KNOBS`) applied."""
        config = cls.for_method(method, compress, seed)
        for name, value in (knobs or {}).items():
            config = _apply_knob(config, name, value)
        return config


#: Flat knob names (the service's "advanced" settings) -> (section, field); section "" is
#: PurifyConfig itself.
KNOBS: dict[str, tuple[str, ...]] = {
    "num_images": ("synthesis", "num_images"),
    "synthesis_iterations": ("synthesis", "iterations"),
    "synthesis_batch_size": ("synthesis", "batch_size"),
    "synthesis_lr": ("synthesis", "lr"),
    "class_weight": ("synthesis", "class_weight"),
    "tv_weight": ("synthesis", "tv_weight"),
    "channels_last": ("synthesis", "channels_last"),
    "proxy": ("proxy", "kind"),
    "pgd_eps": ("proxy", "pgd", "eps"),
    "pgd_steps": ("proxy", "pgd", "steps"),
    "universal_eps": ("proxy", "universal", "eps"),
    "inversion_steps": ("proxy", "inversion", "steps"),
    "inversion_l1": ("proxy", "inversion", "l1_weight"),
    "inversion_use": ("proxy", "inversion", "use"),
    "epochs": ("finetune", "epochs"),
    "lr": ("finetune", "lr"),
    "batch_size": ("finetune", "batch_size"),
    "temperature": ("finetune", "temperature"),
    "kd_weight": ("finetune", "kd_weight"),
    "proxy_weight": ("finetune", "proxy_weight"),
    "feature_weight": ("finetune", "feature_weight"),
    "feature_depth": ("finetune", "feature_depth"),
    "bn_mode": ("finetune", "bn_mode"),
    "early_stopping": ("finetune", "early_stopping"),
    "patience": ("finetune", "patience"),
    "holdout": ("finetune", "holdout"),
    "average_from": ("finetune", "average_from"),
    "stamped_batch": ("finetune", "stamped_batch"),
    "all_to_all_batch": ("finetune", "all_to_all_batch"),
    "all_to_all_weight": ("finetune", "all_to_all_weight"),
    "sensitivity": ("sensitivity",),  # False/None disables
    "sensitivity_u": ("sensitivity", "u"),
    "sensitivity_action": ("sensitivity", "action"),
    "cleaning": ("teacher_cleaning",),  # False/None disables
    "cleaning_u": ("teacher_cleaning", "u"),
    "cleaning_max_fraction": ("teacher_cleaning", "max_fraction"),
    "cleaning_rounds": ("cleaning_rounds",),
    "cleaning_min_agreement": ("cleaning_min_agreement",),
    "cleaning_backoff": ("cleaning_backoff",),
    "cleaning_min_mask_growth": ("cleaning_min_mask_growth",),
    "cleaning_max_flip": ("cleaning_max_flip",),
    "cleaning_min_reach_cut": ("cleaning_min_reach_cut",),
    "cleaning_all_to_all": ("cleaning_all_to_all",),
    "permutation_any_restart": ("permutation_any_restart",),
    "permutation_all_passing": ("permutation_all_passing",),
    "permutation_blend_batch": ("permutation_blend_batch",),
    "permutation_blend_weight": ("permutation_blend_weight",),
    "permutation_patch_peak": ("permutation_patch_peak",),
    "permutation_patch_batch": ("permutation_patch_batch",),
    "permutation_patch_weight": ("permutation_patch_weight",),
    "inverted_beside_all_to_all": ("inverted_beside_all_to_all",),
    "clp_u": ("clp", "u"),
    "clp_compress": ("clp_compress",),
    "recalibrate": ("recalibrate",),
    "drop_disputed": ("drop_disputed",),
    "target_images": ("target_images",),
    "target_class_weight": ("target_class_weight",),
    "target_max_flip": ("target_max_flip",),
    "refresh_every": ("refresh_every",),
    "online_proxies": ("online_proxies",),
    "blend_proxy": ("blend_proxy",),
    "blend_alpha": ("blend_alpha",),
    "blend_noise": ("blend_noise",),
    "augment": ("finetune", "augment"),
    "shift": ("finetune", "shift"),
    "flip": ("finetune", "flip"),
    "mixup": ("finetune", "mixup"),
    "logit_teacher_share": ("finetune", "logit_teacher_share"),
    "logit_teacher_on": ("finetune", "logit_teacher_on"),
    "stamp_fraction": ("finetune", "stamp_fraction"),
    "recal_stamped": ("finetune", "recal_stamped"),
    "proxy_labels": ("finetune", "proxy_labels"),
    "optimizer": ("finetune", "optimizer"),
    "weight_decay": ("finetune", "weight_decay"),
    "detect": ("detect",),
    "verify": ("verify",),  # False/None disables
    "verify_threshold": ("verify", "anomaly_threshold"),
    "verify_min_growth": ("verify", "min_relative_growth"),
    "verify_blend_kept": ("verify", "max_blend_kept"),
    "verify_steps": ("verify", "inversion", "steps"),
    "refit": ("refit",),  # False/None disables
    "refit_damping": ("refit", "damping"),
    "refit_weighting": ("refit", "output_weighting"),
    "permutation": ("permutation",),  # False/None disables
    "permutation_steps": ("permutation", "steps"),
    "permutation_restarts": ("permutation", "restarts"),
    "permutation_information": ("permutation", "information"),
    "permutation_blend_restarts": ("permutation", "blend_restarts"),
    "permutation_blend_alpha": ("permutation", "blend_alpha"),
    "permutation_blend_images": ("permutation", "blend_images_per_class"),
    "permutation_min_flip": ("permutation_min_flip",),
    "permutation_min_targets": ("permutation_min_targets",),
    "permutation_max_anomaly": ("permutation_max_anomaly",),
    "all_to_one_needs_share": ("all_to_one_needs_share",),
    "dynamic": ("dynamic",),  # False/None disables
    "dynamic_steps": ("dynamic", "steps"),
    "dynamic_l1": ("dynamic", "l1_weight"),
    "dynamic_spread": ("dynamic", "spread_weight"),
    "dynamic_min_flip": ("dynamic_min_flip",),
    "dynamic_min_targets": ("dynamic_min_targets",),
    "warp": ("warp",),  # False/None disables
    "warp_steps": ("warp", "steps"),
    "warp_max_shift": ("warp", "max_shift"),
    "warp_min_reach": ("warp_min_reach",),
    "warp_batch": ("warp_batch",),
    "warp_weight": ("warp_weight",),
    "warp_use": ("warp_use",),
    "warp_cleaning_u": ("warp_cleaning_u",),
    "warp_beside_all_to_all": ("warp_beside_all_to_all",),
    "warp_cleaning_other_class": ("warp_cleaning_other_class",),
    "misnamed_inverted": ("misnamed_inverted",),
    "prior_head_ridge": ("prior_head_ridge",),
    "prior_unnamed_ridge": ("prior_unnamed_ridge",),
    "prior_name_share": ("prior_name_share",),
    "share_steers_inversion": ("share_steers_inversion",),
    "prior_correction": ("prior_correction",),
    "prior_reference": ("prior_reference",),
    "prior_max_shift": ("prior_max_shift",),
    "prior_avoided_below": ("prior_avoided_below",),
    "prior_spare_named": ("prior_spare_named",),
    "allocation_spectra": ("allocation_spectra",),
}

#: The string-valued knobs and the values each accepts (the API checks them at submission
#: from a copy, ``app/methods.py``, so a misspelt value is a 422, not a failed job).
KNOB_CHOICES: dict[str, tuple[str, ...]] = {
    "proxy": tuple(PROXY_KINDS),
    "inversion_use": INVERSION_USES,
    "bn_mode": BN_MODES,
    "optimizer": OPTIMIZERS,
    "proxy_labels": PROXY_LABELS,
    "logit_teacher_on": LOGIT_TEACHER_ON,
    "stamped_batch": STAMPED_BATCHES,
    "all_to_all_batch": STAMPED_BATCHES,
    "permutation_blend_batch": STAMPED_BATCHES,
    "permutation_patch_batch": STAMPED_BATCHES,
    "warp_batch": STAMPED_BATCHES,
    "warp_use": WARP_USES,
    "misnamed_inverted": MISNAMED_INVERTED,
    "prior_reference": PRIOR_REFERENCES,
    "sensitivity_action": SENSITIVITY_ACTIONS,
    "blend_proxy": BLEND_PROXIES,
    "refit_weighting": REFIT_WEIGHTINGS,
    "allocation_spectra": ALLOCATION_SPECTRA,
    "permutation_information": INFORMATION,
}


#: The choice knobs whose field also takes None ("unset": the finetune's own setting); a
#: job's ``advanced`` may send null for them (the API's copy: ``app/methods.py``).
NULLABLE_CHOICES: frozenset[str] = frozenset(
    {"all_to_all_batch", "permutation_blend_batch", "permutation_patch_batch", "warp_batch"}
)


def _optional_defaults() -> dict[str, Any]:
    """The sections a boolean knob switches on or off, with the setting it switches on."""
    return {
        "sensitivity": SensitivityConfig(),
        "teacher_cleaning": CLEANING,
        "refit": RefitConfig(),
        "permutation": PERMUTATION,
        "dynamic": DYNAMIC,
        "warp": WARP,
        "verify": VerifyConfig(inversion=INVERSION),
    }


def _apply_knob(config: PurifyConfig, name: str, value: Any) -> PurifyConfig:
    if name not in KNOBS:
        raise ValueError(
            f"unknown purification setting {name!r}; known: {', '.join(sorted(KNOBS))}"
        )
    check_knob(name, value)
    path = KNOBS[name]
    defaults = _optional_defaults()
    if len(path) == 1 and path[0] in defaults:
        section = path[0]  # a switch: check_knob let through only true, false or null
        chosen = (getattr(config, section) or defaults[section]) if value is True else None
        changes: dict[str, Any] = {section: chosen}
        return dataclasses.replace(config, **changes)

    def set_in(obj: Any, keys: tuple[str, ...]) -> Any:
        if obj is None and keys:
            obj = defaults[path[0]]  # a sub-knob of a disabled section switches it on
        if len(keys) == 1:
            return dataclasses.replace(obj, **{keys[0]: value})
        return dataclasses.replace(obj, **{keys[0]: set_in(getattr(obj, keys[0]), keys[1:])})

    result: PurifyConfig = set_in(config, path)
    return result


@dataclass
class PurifyResult:
    """The purified compact model and what each stage found."""

    model: nn.Module
    method: str
    compress: CompressResult | None = None
    suspected_target: int | None = None
    detection: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    finetune: FinetuneResult | None = None
    sensitivity: SensitivityResult | None = None
    clp: CLPResult | None = None
    proxies: ProxySet | None = None
    # The class-prior correction's reference teacher's logits on the synthetic images (the
    # correction redone from them by bench/prior_variants.py); not in any report
    prior_reference_logits: Tensor | None = None


def _stages(config: PurifyConfig) -> list[tuple[str, float]]:
    m = config.method
    if m == "compress":
        return [("compress", 1.0)]
    if m == "clp":
        return [("clp", 1.0)] + ([("compress", 1.0)] if config.clp_compress else [])
    s = config.synthesis
    work = s.num_images * s.iterations / 1000.0
    stages = [("synthesis", max(work, 0.1))]
    if config.detect:
        stages.append(("detect_before", config.detect_pgd.steps * config.detect_images / 1000))
    if config.proxy.kind == "trigger_inversion":
        inv = config.proxy.inversion
        proxy_work = inv.steps * inv.images_per_class * 10 / 1000
    else:
        proxy_work = config.proxy.pgd.steps * s.num_images / 1000
    stages.append(("proxies", max(proxy_work, 0.1)))
    if config.permutation is not None and config.proxy.kind == "trigger_inversion":
        pm = config.permutation
        restarts = pm.restarts + pm.blend_restarts
        stages.append(("permutation", pm.steps * restarts * pm.images_per_class * 10 / 1000))
    if config.dynamic is not None and config.proxy.kind == "trigger_inversion":
        dy = config.dynamic
        stages.append(("dynamic", dy.steps * dy.images_per_class * 10 / 1000))
    if config.warp is not None and config.proxy.kind == "trigger_inversion":
        stages.append(("warp", config.warp.steps * config.warp.images * 10 / 1000 * 1.5))
    if config.teacher_cleaning is not None:
        inv = config.proxy.inversion
        stages.append(
            ("cleaning", config.cleaning_rounds * inv.steps * inv.images_per_class / 1000)
        )
    if config.target_images > 0 and config.teacher_cleaning is not None:
        stages.append(("target_synthesis", max(config.target_images * s.iterations / 1000, 0.1)))
    stages.append(("compress", 0.5))
    if config.refit is not None:
        stages.append(("refit", 0.2))
    if config.sensitivity is not None:
        stages.append(("sensitivity", 0.2))
    ft = config.finetune
    ft_cost = 1.3 if ft.feature_weight > 0 else 1.0  # the teacher runs every step
    stages.append(("finetune", max(ft.epochs * s.num_images * 2 / 1000 * 0.5 * ft_cost, 0.1)))
    if config.prior_correction > 0:
        stages.append(("prior", (config.prior_correction + 2) * s.num_images / 10000))
    if config.detect:
        stages.append(("detect_after", config.detect_pgd.steps * config.detect_images / 2000))
    if config.verify is not None:
        inv = config.verify.inversion
        stages.append(("verify", inv.steps * inv.images_per_class * 10 / 3000))
    return stages


def _pgd_detection(
    model: nn.Module,
    probe: Tensor,
    when: str,
    config: PurifyConfig,
    detection: dict[str, Any],
    plan: StagePlan,
    *,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> None:
    """Stage ``detect_{when}``: the class histogram of PGD proxies on ``model``, into
    ``detection`` (``histograms.adversarial_{when}`` and ``pgd_{when}``)."""
    stage = f"detect_{when}"
    with plan.stage(stage):
        hist, top, share = adversarial_histogram(
            model,
            probe,
            config.detect_pgd,
            mean=mean,
            std=std,
            seed=config.seed,
            progress=plan.nested(stage),
        )
    detection["histograms"][f"adversarial_{when}"] = hist
    detection[f"pgd_{when}"] = {"suspected_target": top, "share": share}


def purify(
    model: nn.Module,
    config: PurifyConfig,
    *,
    mean: float | tuple[float, ...] = 0.0,
    std: float | tuple[float, ...] = 1.0,
    input_shape: tuple[int, ...] = (3, 32, 32),
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    synthetic: Tensor | None = None,
    proxies: ProxySet | None = None,
) -> PurifyResult:
    """Remove a backdoor from ``model`` and compress it, data-free.

    Parameters
    ----------
    model : nn.Module
        The possibly backdoored classifier (inputs normalised by ``mean``/``std``). Not
        changed; it is moved to ``device``'s copy only.
    config : PurifyConfig
    input_shape : tuple
        ``(C, H, W)``, or ``(N, C, H, W)`` with the batch axis ignored.
    device : torch.device or str
    progress : callable, optional
        ``progress(stage, fraction)`` with the overall fraction; raise ``Cancelled`` to stop.
    synthetic, proxies : optional
        Synthetic images (normalised space) and proxies already made from this same
        ``model`` with this ``config`` (benchmarks reuse them across ratios); skipped stages
        then report nothing.

    Returns
    -------
    PurifyResult
    """
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.allocation_spectra not in ALLOCATION_SPECTRA:
        raise ValueError(
            f"allocation_spectra must be one of {ALLOCATION_SPECTRA}, "
            f"not {config.allocation_spectra!r}"
        )
    if config.blend_proxy not in BLEND_PROXIES:
        raise ValueError(f"blend_proxy must be one of {BLEND_PROXIES}, not {config.blend_proxy!r}")
    if config.prior_reference not in PRIOR_REFERENCES:
        raise ValueError(
            f"prior_reference must be one of {PRIOR_REFERENCES}, not {config.prior_reference!r}"
        )
    if config.warp_use not in WARP_USES:
        raise ValueError(f"warp_use must be one of {WARP_USES}, not {config.warp_use!r}")
    if config.misnamed_inverted not in MISNAMED_INVERTED:
        raise ValueError(
            f"misnamed_inverted must be one of {MISNAMED_INVERTED}, "
            f"not {config.misnamed_inverted!r}"
        )
    for name in ("permutation_blend_batch", "permutation_patch_batch"):
        if getattr(config, name) not in (None, *STAMPED_BATCHES):
            raise ValueError(
                f"{name} must be None or one of {STAMPED_BATCHES}, not {getattr(config, name)!r}"
            )
    if config.refit is not None and config.method in ("cnc", "cnc-paper"):
        if config.refit.output_weighting not in REFIT_WEIGHTINGS:
            raise ValueError(
                f"refit_weighting must be one of {REFIT_WEIGHTINGS}, "
                f"not {config.refit.output_weighting!r}"
            )
        if config.compress.scaling != "none":
            raise ValueError("refit and singular-value scaling are exclusive: set one of them")
    device = torch.device(device)
    shape = tuple(input_shape[-3:])
    teacher = copy.deepcopy(model).to(device).eval()
    plan = StagePlan(_stages(config), progress)
    torch.manual_seed(config.seed)  # any library randomness beyond our own generators

    if config.method == "compress":
        with plan.stage("compress"):
            cres = compress(
                teacher, config.compress, progress=plan.nested("compress"), input_shape=shape
            )
        return PurifyResult(cres.model.eval(), config.method, cres, timings=dict(plan.timings))

    if config.method == "clp":
        example = torch.zeros(2, *shape, device=device)
        with plan.stage("clp"):
            cl = clp(teacher, config.clp, example=example, progress=plan.nested("clp"))
        result = PurifyResult(cl.model.eval(), config.method, clp=cl)
        if config.clp_compress:
            with plan.stage("compress"):
                cres = compress(
                    cl.model, config.compress, progress=plan.nested("compress"), input_shape=shape
                )
            result.model, result.compress = cres.model.eval(), cres
        result.detection = {"clp_pruned": cl.pruned}
        result.timings = dict(plan.timings)
        return result

    # --- cnc / cnc-paper -------------------------------------------------------------------
    synth_cfg = dataclasses.replace(config.synthesis, image_shape=shape)  # type: ignore[arg-type]
    with plan.stage("synthesis"):
        clean = (
            synthetic.to(device)
            if synthetic is not None
            else synthesize(
                teacher,
                synth_cfg,
                mean=mean,
                std=std,
                device=device,
                progress=plan.nested("synthesis"),
            )
        )
    # every later stage runs on these images (and copies of them): faster in this layout
    clean = cpu_channels_last(clean, config.synthesis.channels_last)
    detection: dict[str, Any] = {"histograms": {}}
    with torch.no_grad():
        num_classes = int(teacher(clean[:1]).shape[1])
    probe = clean[: config.detect_images]
    if config.detect:
        _pgd_detection(teacher, probe, "before", config, detection, plan, mean=mean, std=std)

    with plan.stage("proxies"):
        proxies = (
            proxies
            if proxies is not None
            else make_proxies(
                teacher,
                clean,
                config.proxy,
                mean=mean,
                std=std,
                num_classes=num_classes,
                progress=plan.nested("proxies"),
            )
        )
    # the original's logits on the synthetic images, computed once where a rule reads them
    original_logits = logits_of(teacher, clean) if _reads_original(config, proxies) else None
    original_share = None if original_logits is None else mean_softmax(original_logits)
    by_share = shared_targets(original_share, config.prior_name_share)
    # the classes the share names and the shares, where a rule before the searches reads them
    share_named = (
        (by_share, original_share)
        if original_share is not None and _share_read_early(config, proxies)
        else None
    )
    detection["proxy"] = {
        "kind": proxies.kind,
        "suspected_target": proxies.suspected_target,
        "share": proxies.share,
        "flip_rate": proxies.flip_rate,
        "histogram": proxies.histogram,
    }
    if proxies.inversion is not None:
        inv = proxies.inversion
        detection["trigger_inversion"] = {
            "suspected_target": inv.suspected_target,
            "anomaly_index": inv.anomaly_index,
            "mask_norms": inv.mask_norms,
            "success": inv.success,
            "anomaly_indices": inv.anomaly_indices,
        }
        detection["histograms"]["inverted_trigger_before"] = proxies.histogram

    searches = any(getattr(config, s) is not None for s in ("permutation", "dynamic", "warp"))
    if searches and proxies.inversion is not None:
        # the searches for triggers Neural Cleanse cannot invert (all-to-all, warp), skipped
        # where it names an all-to-one target
        anomaly = proxies.inversion.anomaly_index
        nc_class = proxies.inversion.suspected_target
        limit = config.permutation_max_anomaly
        all_to_one = limit is not None and anomaly >= limit
        if (
            all_to_one
            and config.all_to_one_needs_share
            and share_named is not None
            and nc_class not in share_named[0]
        ):
            all_to_one = False
            detection["all_to_one_unconfirmed"] = {
                "neural_cleanse": nc_class,
                "anomaly_index": round(anomaly, 4),
                "share": round(float(share_named[1][nc_class]), 4),
            }
        skipped = (
            f"Neural Cleanse named class {nc_class}"
            f" with anomaly index {anomaly:.2f} >= {limit:g} (an all-to-one target)"
            if all_to_one
            else None
        )
        # each search in its own timed stage; its record (or why it was skipped) goes to
        # ``detection["<stage>_inversion"]``
        reasons: dict[str, str | None] = {}
        for stage, add in (
            ("permutation", _add_permutation_trigger),
            ("dynamic", _add_dynamic_trigger),
            ("warp", _add_warp_trigger),
        ):
            if getattr(config, stage) is None:
                continue
            reason = skipped
            if stage == "dynamic" and reason is None and _permutation_used(proxies, blend=False):
                reason = "the one-pattern permutation trigger was found and is used"
            if stage == "warp" and reason is None:
                reason = _warp_unused(config, proxies)
            reasons[stage] = reason
            with plan.stage(stage):
                if reason is None:
                    proxies = add(teacher, clean, proxies, config, mean, std, plan.nested(stage))
        for stage, reason in reasons.items():  # after all: a later search may replace a find
            detection[f"{stage}_inversion"] = getattr(proxies, f"{stage}_record") or {
                "used": False,
                "skipped": reason,
            }

    steered = _share_steer(proxies, share_named, config)
    if steered is not None:
        proxies, detection["share_steer"] = _steer_inversion(
            clean, proxies, steered, config, mean, std
        )
    config = _apart_trigger_settings(config, proxies)
    kd_teacher = teacher
    trigger_untrusted = False
    target_extra: Tensor | None = None
    all_to_all_only = _all_to_all_only(config, proxies)
    if all_to_all_only and config.teacher_cleaning is not None:
        detection["teacher_cleaning"] = {
            "skipped": "an all-to-all trigger passed its gate and the inverted per-class "
            "triggers are left out (inverted_beside_all_to_all=false)"
        }
    if (
        config.teacher_cleaning is not None
        and proxies.inversion is not None
        and not all_to_all_only
    ):
        with plan.stage("cleaning"):
            kd_teacher, cleaning = _clean_teacher(
                teacher,
                clean,
                proxies,
                config,
                mean,
                std,
                num_classes,
                plan.nested("cleaning"),
                evidenced=_evidenced_targets(config, proxies, by_share),
            )
        detection["teacher_cleaning"] = cleaning
        # The guard undid the cleaning: the inverted trigger is likely the wrong class, so the
        # held-out "proxy fix" score is no guide (it falls as training goes on and restored
        # epoch 2 of 30 on WaNet: 61.5% ACC, against 72.8% / 2.9% ASR for the last epoch,
        # explore-purify.md 4g): fine-tuning keeps the last epoch instead. (A round undone
        # because the mask did not grow leaves the trigger trusted: it is real, pruning just
        # cannot reach it.)
        trigger_untrusted = (
            cleaning["rounds_applied"] == 0 and cleaning["rounds"][0].get("undone") == "agreement"
        ) or (
            # the warp named another class than Neural Cleanse: the inverted trigger, whose
            # fix rate is half the criterion, is the wrong class's (WaNet all-to-one: the
            # criterion restored epoch 5 of 15, 85.25 / 3.00; the last epoch 86.55 / 3.15)
            cleaning["trigger"] == "warp"
            and cleaning["target"] != proxies.inversion.suspected_target
        )
        if config.target_images > 0 and cleaning["trigger"] == "all-to-all":
            detection["target_synthesis"] = {
                "images": 0,
                "skipped": "the cleaning used the all-to-all trigger: there is no one target",
            }
        elif config.target_images > 0:
            held = [rnd for rnd in cleaning["rounds"] if not rnd.get("undone")]
            with plan.stage("target_synthesis"):
                target_extra, detection["target_synthesis"] = _target_synthesis(
                    teacher,
                    kd_teacher if held else None,
                    held[-1]["flip_after"] if held else None,
                    cleaning["target"],
                    synth_cfg,
                    config,
                    mean,
                    std,
                    device,
                    plan.nested("target_synthesis"),
                )

    with plan.stage("compress"):
        spectra = moments = None
        if config.allocation_spectra == "response":
            # the activation moments, measured once: the allocation and the refit share them
            names = compressible_layers(kd_teacher, config.compress)
            refit_cfg = config.refit or RefitConfig()
            moments = layer_moments(
                kd_teacher,
                names,
                clean,
                batch_size=refit_cfg.batch_size,
                progress=plan.nested("compress"),
                stage="compress",
            )
            spectra = activation_spectra(kd_teacher, names, clean, refit_cfg, moments=moments)
        progress_fn = None if spectra is not None else plan.nested("compress")
        cres = compress(
            kd_teacher, config.compress, progress=progress_fn, spectra=spectra, input_shape=shape
        )
        if spectra is not None:
            cres.spectra = "response"
    student = cres.model.to(device)
    if config.refit is not None:
        with plan.stage("refit"):
            refit_compact(
                kd_teacher,
                cres,
                clean,
                config.refit,
                moments=moments,
                progress=plan.nested("refit"),
            )
    if config.recalibrate:
        recalibrate_bn(student, clean, batch_size=config.finetune.batch_size)

    sens: SensitivityResult | None = None
    if config.sensitivity is not None and _nothing_to_unlearn(proxies):
        detection["sensitivity_suppressed"] = 0
        detection["sensitivity_skipped"] = "no trigger is left to compare responses to"
    elif config.sensitivity is not None:
        with plan.stage("sensitivity"):
            sens = suppress_sensitive_ranks(
                student,
                clean,
                proxies.images,
                config.sensitivity,
                progress=plan.nested("sensitivity"),
            )
        detection["sensitivity_suppressed"] = sens.num_suppressed

    best_epoch = config.finetune.early_stopping and not trigger_untrusted
    ft_cfg = dataclasses.replace(
        config.finetune, refresh_every=config.refresh_every, early_stopping=best_epoch
    )
    detection["finetune_selection"] = (
        "best epoch"
        if best_epoch
        else "last epoch" + (" (inverted trigger untrusted)" if trigger_untrusted else "")
    )
    stamp = a2a_stamp = None
    if config.online_proxies:
        stamp, a2a_stamp = _finetune_stamps(config, proxies, mean, std)
    if a2a_stamp is not None:
        a2a_batch, a2a_weight = ft_cfg.all_to_all_settings()
        detection["all_to_all_stamp"] = {"batch": a2a_batch, "weight": a2a_weight}
        trigger_shape = _apart_shape(config, proxies)
        if trigger_shape is not None:
            detection["all_to_all_stamp"]["shape"] = trigger_shape
    blend = None
    if config.blend_proxy != "none" and (stamp is not None or a2a_stamp is not None):
        blend, detection["blend_proxy"] = _blend_stamp(
            config, teacher, clean, proxies.suspected_target, mean, std, num_classes
        )
        if blend is not None:
            stamp = mixed_stamp([s for s in (stamp, blend) if s is not None])
    with plan.stage("finetune"):
        ft_images = clean
        if config.drop_disputed and kd_teacher is not teacher:
            disputed = disputed_images(teacher, kd_teacher, clean, proxies.suspected_target)
            ft_images = clean[~disputed]
            detection["disputed_dropped"] = int(disputed.sum())
        if target_extra is not None:
            ft_images = torch.cat([ft_images, target_extra])
        if stamp is not None or a2a_stamp is not None:
            # input-agnostic proxies: stamped on the fly on augmented clean batches
            refresh_stamp = None
            if config.refresh_every > 0 and proxies.inversion is not None:
                refresh_stamp = _stamp_refresher(
                    config, clean, proxies, mean, std, num_classes, blend=blend
                )
            ft = finetune(
                student,
                kd_teacher,
                ft_images,
                None,
                None,
                ft_cfg,
                progress=plan.nested("finetune"),
                stamp=stamp,
                refresh_stamp=refresh_stamp,
                all_to_all_stamp=a2a_stamp,
                logit_teacher=teacher if kd_teacher is not teacher else None,
            )
        else:
            refresh = None
            if config.refresh_every > 0:
                refresh = _refresher(config, clean, proxies, mean, std, num_classes)
            bare = _nothing_to_unlearn(proxies)
            ft = finetune(
                student,
                kd_teacher,
                ft_images,
                None if bare else proxies.images,
                None if bare else proxies.labels,
                ft_cfg,
                progress=plan.nested("finetune"),
                refresh=refresh,
                logit_teacher=teacher if kd_teacher is not teacher else None,
            )

    if ft.averaged_epochs:
        detection["finetune_selection"] = (
            f"average of the last {ft.averaged_epochs} epochs' weights"
            if ft.averaged
            else detection["finetune_selection"]
            + f" (it scored above the average of the last {ft.averaged_epochs} epochs)"
        )
    reference_logits = None
    if config.prior_correction > 0:
        with plan.stage("prior"):
            spared = sorted({*named_targets(config.prior_spare_named, proxies), *by_share})
            unnamed = config.prior_unnamed_ridge is not None and not spared
            reference_name = "original" if unnamed else config.prior_reference
            ridge = config.prior_unnamed_ridge if unnamed else config.prior_head_ridge
            if reference_name == "original":
                assert original_logits is not None
                reference_logits = original_logits
            else:
                reference_logits = logits_of(kd_teacher, clean)
            if ridge is not None:
                corrected = refit_to_prior(
                    student,
                    clean,
                    reference_logits,
                    num_classes=num_classes,
                    ridge=ridge,
                    avoided_below=config.prior_avoided_below,
                    spared=spared,
                )
            else:  # the reference's distribution from the logits above, not a 2nd pass
                corrected = shift_to_prior(
                    student,
                    clean,
                    mean_softmax(reference_logits),
                    num_classes=num_classes,
                    iterations=config.prior_correction,
                    max_shift=config.prior_max_shift,
                    avoided_below=config.prior_avoided_below,
                    spared=spared,
                )
            detection["prior_correction"] = (
                {
                    **dataclasses.asdict(corrected),
                    "reference": reference_name,
                    "avoided_below": config.prior_avoided_below,
                    "spare_named": config.prior_spare_named,
                    "max_shift": config.prior_max_shift,
                    "head_ridge": ridge,
                    "unnamed_refit": unnamed,
                    "name_share": config.prior_name_share,
                    "named_by_share": by_share,
                    "original_share": None
                    if original_share is None
                    else [round(v, 4) for v in original_share.tolist()],
                }
                if corrected is not None
                else {"skipped": "the model has no classifier layer with a bias"}
            )
    suspected = proxies.suspected_target
    if config.detect:
        _pgd_detection(student, probe, "after", config, detection, plan, mean=mean, std=std)
        if proxies.inversion is not None:
            still = predict(student, proxies.images)
            detection["inverted_trigger_after_share"] = float(
                (still == proxies.inversion.suspected_target).float().mean()
            )
    if config.verify is not None:
        with plan.stage("verify"):
            original_inversion = proxies.inversion or trigger_inversion(  # PGD proxies: none
                teacher,
                clean,
                config.verify.inversion,
                mean=mean,
                std=std,
                num_classes=num_classes,
                generator=torch.Generator().manual_seed(config.seed + config.verify.seed_offset),
            )
            detection["verify"] = residual_check(
                student,
                clean,
                config.verify,
                original_inversion,
                original_model=teacher,
                acted_on=suspected,
                mean=mean,
                std=std,
                num_classes=num_classes,
                seed=config.seed,
                progress=plan.nested("verify"),
            )
    return PurifyResult(
        model=student.eval(),
        method=config.method,
        compress=cres,
        suspected_target=suspected,
        detection=detection,
        timings=dict(plan.timings),
        finetune=ft,
        sensitivity=sens,
        proxies=proxies,
        prior_reference_logits=reference_logits,
    )


def disputed_images(original: nn.Module, cleaned: nn.Module, images: Tensor, target: int) -> Tensor:
    """Boolean mask of the ``images`` that ``original`` assigns to ``target`` and ``cleaned``
    does not (``PurifyConfig.drop_disputed``)."""
    return (predict(original, images) == target) & (predict(cleaned, images) != target)


def _target_synthesis(
    original: nn.Module,
    cleaned: nn.Module | None,
    residual_flip: float | None,
    target: int,
    synth_cfg: SynthesisConfig,
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    device: torch.device,
    progress: ProgressFn,
) -> tuple[Tensor | None, dict[str, Any]]:
    """``config.target_images`` images of class ``target`` synthesised from the ``cleaned``
    model (``PurifyConfig.target_images``), and a record of what both models call them.

    None when no cleaning round held (``cleaned`` is None: the original model would draw the
    trigger again), or when the stamped trigger still reaches the target on more than
    ``config.target_max_flip`` of the images after cleaning (``residual_flip``)."""
    n = config.target_images
    skipped = None
    if cleaned is None:
        skipped = "no cleaning round held"
    elif residual_flip is not None and residual_flip > config.target_max_flip:
        skipped = (
            f"the stamped trigger still reaches the target on {100 * residual_flip:.1f}% of "
            f"the images after cleaning (> {100 * config.target_max_flip:g}%)"
        )
    if cleaned is None or skipped is not None:
        progress("target_synthesis", 1.0)
        return None, {"images": 0, "skipped": skipped}
    cfg = dataclasses.replace(
        synth_cfg,
        num_images=n,
        batch_size=min(synth_cfg.batch_size, n),
        class_weight=config.target_class_weight,
        seed=config.seed + 300,
    )
    classes = torch.full((n,), target, dtype=torch.long)
    images = synthesize(
        cleaned,
        cfg,
        mean=mean,
        std=std,
        device=device,
        progress=progress,
        stage="target_synthesis",
        classes=classes,
    )
    by_cleaned = float((predict(cleaned, images) == target).float().mean())
    by_original = float((predict(original, images) == target).float().mean())
    record = {
        "images": n,
        "target": target,
        "class_weight": config.target_class_weight,
        "cleaned_says_target": by_cleaned,
        "original_says_target": by_original,
    }
    return images, record


def _clean_teacher(
    teacher: nn.Module,
    clean: Tensor,
    proxies: ProxySet,
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    num_classes: int,
    progress: ProgressFn,
    evidenced: frozenset[int] = frozenset(),
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune the trigger-sensitive channels of a copy of ``teacher`` (see PurifyConfig).

    ``evidenced``: the classes named as the target with evidence (:func:`_evidenced_targets`);
    only a round whose target is one of them may be trimmed (``cleaning_backoff``).

    A round that leaves the model agreeing with ``teacher`` on fewer than
    ``config.cleaning_min_agreement`` of the clean synthetic images is undone and ends the
    cleaning (``undone: "agreement"``): such a collapse means the channels pruned carried the
    model's clean function (a wrongly named target), not a trigger. So is a round after which
    the re-inverted trigger's mask is less than ``config.cleaning_min_mask_growth`` times its
    size before (``undone: "mask_growth"``), or after which the round's stamped images still
    reach the target more often than ``config.cleaning_max_flip`` (``undone: "flip"``), or
    less than ``config.cleaning_min_reach_cut`` below the share before the round (``undone:
    "reach_cut"``): the pruning did not touch the trigger.
    """
    assert config.teacher_cleaning is not None and proxies.inversion is not None
    cleaned = copy.deepcopy(teacher)
    inv = proxies.inversion
    # 512 paired images score the channels well enough and bound the cost
    clean, proxy_images = clean[:512], proxies.images[:512]
    target = inv.suspected_target
    mask_norm = inv.mask_norms[target]
    inv_cfg = dataclasses.replace(config.proxy.inversion, classes=(target,))
    images = proxy_images
    source = predict(teacher, clean)
    all_to_all = _all_to_all_trigger(config, proxies, mean, std)
    kind = "inverted"
    cleaning_cfg = config.teacher_cleaning
    if all_to_all is None and proxies.cleaning_warp is not None:
        assert proxies.warp_record is not None
        target = int(proxies.warp_record["suspected_target"])
        images = apply_warp(clean, proxies.cleaning_warp.to(clean.device), mean=mean, std=std)
        kind = "warp"
        if config.warp_cleaning_u is not None:
            cleaning_cfg = dataclasses.replace(cleaning_cfg, u=config.warp_cleaning_u)
    # what a stamped image of each clean class reaches: the target, or its image under the
    # all-to-all trigger's mapping; -1 where a flip cannot be counted
    reach_of = torch.full((num_classes,), target, dtype=torch.long, device=clean.device)
    reach_of[target] = -1
    if all_to_all is not None:
        stamp, mapping = all_to_all
        images = stamp(clean, torch.Generator(device="cpu").manual_seed(config.seed + 952))
        reach_of = torch.tensor(mapping, dtype=torch.long, device=clean.device)
        kind = "all-to-all"
    goal = reach_of[source]
    counted = goal >= 0

    def flip(net: nn.Module, stamped: Tensor) -> float:
        if not bool(counted.any()):
            return 0.0
        return float((predict(net, stamped[counted]) == goal[counted]).float().mean())

    rounds: list[dict[str, Any]] = []
    n = max(config.cleaning_rounds, 1)
    for r in range(n):
        before = copy.deepcopy(cleaned.state_dict())
        flip_before = flip(cleaned, images)
        res = suppress_sensitive_ranks(cleaned, clean, images, cleaning_cfg)
        kept = agreement(cleaned, teacher, clean)
        suppressed, backoff = res.num_suppressed, None
        trim = config.cleaning_backoff and kind != "all-to-all" and target in evidenced
        if trim and kept < config.cleaning_min_agreement:
            backoff = {"planned": res.num_suppressed, "agreement_planned": kept}
            suppressed, kept = _back_off(
                cleaned, before, res, lambda: agreement(cleaned, teacher, clean), config
            )
        rec: dict[str, Any] = {
            "suppressed": suppressed,
            "agreement": kept,
            "flip_before": flip_before,
            "flip_after": flip(cleaned, images),
        }
        if backoff is not None:
            rec["backoff"] = backoff
        rounds.append(rec)
        undone = None
        if kept < config.cleaning_min_agreement or (backoff is not None and suppressed == 0):
            undone = "agreement"
        elif config.cleaning_max_flip is not None and rec["flip_after"] > config.cleaning_max_flip:
            undone = "flip"
        elif config.cleaning_min_reach_cut is not None and rec["flip_after"] > flip_before * (
            1.0 - config.cleaning_min_reach_cut
        ):
            undone = "reach_cut"
        elif kind != "inverted":
            pass  # no per-class trigger to re-invert; the stamped images stay the same
        else:
            # re-invert on the cleaned model: the next round's proxies, and the residual signal
            gen = torch.Generator(device="cpu").manual_seed(config.seed + 500 + r)
            new = trigger_inversion(
                cleaned, clean, inv_cfg, mean=mean, std=std, num_classes=num_classes, generator=gen
            )
            rec["target_mask_norm"] = new.mask_norms[0]
            rec["target_success"] = new.success[0]
            rec["mask_growth"] = new.mask_norms[0] / max(mask_norm, 1e-12)
            if (
                config.cleaning_min_mask_growth is not None
                and rec["mask_growth"] < config.cleaning_min_mask_growth
            ):
                undone = "mask_growth"
        if undone is not None:
            cleaned.load_state_dict(before)
            rec["undone"] = undone
            progress("cleaning", 1.0)
            break
        if kind == "inverted":
            mask_norm = new.mask_norms[0]
            images = apply_trigger(clean, new.masks[0], new.patterns[0], mean=mean, std=std)
        progress("cleaning", (r + 1) / n)
    applied = sum(not rec.get("undone", False) for rec in rounds)
    return cleaned.eval(), {
        "rounds": rounds,
        "rounds_applied": applied,
        "agreement_with_original": agreement(cleaned, teacher, clean),
        "trigger": kind,
        "target": target if kind != "all-to-all" else None,
    }


def _evidenced_targets(
    config: PurifyConfig, proxies: ProxySet, by_share: list[int]
) -> frozenset[int]:
    """The classes named as the backdoor target with evidence, for ``cleaning_backoff``:
    Neural Cleanse's (or the share-steered) class at an anomaly index past the inversion's
    threshold, the class of a warp past its gate, and ``by_share``, the classes the
    original's share names (``prior_name_share``). A trimmed round on a class nothing names
    is a cleaning of a natural class: a clean width-8 model kept 8 of 10 channels of one and
    lost 3.05 points (82.70 -> 79.65, explore-purify.md 4ag)."""
    return frozenset({*named_targets(config.proxy.inversion.anomaly_threshold, proxies), *by_share})


def _back_off(
    cleaned: nn.Module,
    before: dict[str, Tensor],
    planned: SensitivityResult,
    kept: Callable[[], float],
    config: PurifyConfig,
) -> tuple[int, float]:
    """Trim a cleaning round that failed the agreement bar (``PurifyConfig.cleaning_backoff``).

    Of the round's ``planned`` components, suppress only the longest strongest-first prefix
    after which ``kept()`` (agreement with the original) still reaches
    ``config.cleaning_min_agreement``, found by bisection (agreement falls as more are
    pruned). ``cleaned`` is reset to ``before`` and holds the trimmed round on return; the
    number suppressed and the agreement are returned (0 components: the model before).
    """
    assert config.teacher_cleaning is not None
    include_dense = config.teacher_cleaning.include_dense
    order = strongest_first(planned)

    def apply(k: int) -> float:
        cleaned.load_state_dict(before)
        chosen: dict[str, list[int]] = {}
        factors: dict[str, list[float]] = {}
        for name, i, f in order[:k]:
            chosen.setdefault(name, []).append(i)
            factors.setdefault(name, []).append(f)
        apply_suppression(cleaned, chosen, factors, include_dense)
        return kept()

    lo, hi = 0, len(order)  # lo: meets the bar (the model before); hi: the round as planned
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if apply(mid) >= config.cleaning_min_agreement:
            lo = mid
        else:
            hi = mid
    return lo, apply(lo)


def _all_to_all_trigger(
    config: PurifyConfig,
    proxies: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> tuple[StampFn, list[int]] | None:
    """The all-to-all trigger cleaning uses (``PurifyConfig.cleaning_all_to_all``) as a stamp
    and its class mapping: the dynamic one if it passed its gate, else the permutation
    trigger if it did; None otherwise or when the knob is off."""
    if not config.cleaning_all_to_all:
        return None
    if proxies.dynamic_generator is not None and proxies.dynamic_record is not None:
        return (
            dynamic_stamp(proxies.dynamic_generator, mean=mean, std=std),
            proxies.dynamic_record["mapping"],
        )
    if proxies.extra_triggers is not None and proxies.permutation_record is not None:
        masks, patterns = proxies.extra_triggers
        return (
            trigger_stamp(masks, patterns, mean=mean, std=std),
            proxies.permutation_record["mapping"],
        )
    return None


def _permutation_used(proxies: ProxySet, *, blend: bool = True) -> bool:
    """Whether the one-pattern permutation trigger passed its gate (``blend=False``: and is
    a learned mask, not a whole-image blend restart)."""
    record = proxies.permutation_record or {}
    return bool(record.get("used")) and (blend or not record.get("blend"))


def _add_permutation_trigger(
    teacher: nn.Module,
    clean: Tensor,
    proxies: ProxySet,
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    progress: ProgressFn,
) -> ProxySet:
    """Invert a permutation trigger on ``teacher`` and add it if it passes the gate.

    The proxy images are re-stamped so that each carries one of the chosen Neural-Cleanse
    triggers or the permutation trigger at random; the latter is kept in
    ``extra_triggers`` for on-the-fly stamping. ``permutation_record`` says what was found.
    """
    assert config.permutation is not None and proxies.inversion is not None
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 900)
    perm = permutation_inversion(
        teacher, clean, config.permutation, mean=mean, std=std, generator=gen, progress=progress
    )
    candidates = perm.candidates or [perm]
    if not config.permutation_any_restart:
        candidates = candidates[:1]
    records = [
        _gate(c, config.permutation_min_flip, config.permutation_min_targets)
        | {"peak_share": c.peak_share}
        for c in candidates
    ]
    chosen = next((i for i, r in enumerate(records) if r["used"]), 0)
    perm, record = candidates[chosen], records[chosen]
    # every restart's outcome, best objective first, and which one was taken
    record["restart"] = chosen
    record["restarts"] = [
        {k: r[k] for k in ("flip_rate", "targets", "mapping", "peak_share", "used")}
        | {"blend": c.blend}
        for c, r in zip(candidates, records, strict=True)
    ]
    record["blend"] = perm.blend
    out = dataclasses.replace(proxies, permutation_record=record)
    if not record["used"]:
        return out
    stamped = [perm]
    if config.permutation_all_passing:
        stamped += [
            c for c, r in zip(candidates, records, strict=True) if r["used"] and c is not perm
        ]
        record["stamped"] = len(stamped)
    out.extra_triggers = (
        torch.stack([c.mask for c in stamped]),
        torch.stack([c.pattern for c in stamped]),
    )
    return _restamped(out, clean, config, mean, std, seed_offset=901)


def _gate(
    found: PermutationInversionResult | DynamicInversionResult, min_flip: float, min_targets: float
) -> dict[str, Any]:
    """The record of an all-to-all trigger search, with ``used``: whether the trigger moved at
    least ``min_flip`` of the synthetic images onto at least ``min_targets`` of the classes."""
    targets = len({t for t in found.mapping if t >= 0})
    return {
        "mask_norm": found.mask_norm,
        "flip_rate": found.flip_rate,
        "mutual_information": found.mutual_information,
        "top_share": found.top_share,
        "mapping": found.mapping,
        "targets": targets,
        "used": found.flip_rate >= min_flip and targets >= min_targets * len(found.mapping),
    }


def _restamped(
    proxies: ProxySet,
    clean: Tensor,
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    seed_offset: int,
) -> ProxySet:
    """``proxies`` with its images re-stamped from ``clean`` by :func:`_stamp_of`."""
    stamp = _stamp_of(config, proxies, mean, std)
    assert stamp is not None  # the proxies carry an inversion
    gen = torch.Generator(device="cpu").manual_seed(config.seed + seed_offset)
    proxies.images = stamp(clean, gen)
    return proxies


def _add_dynamic_trigger(
    teacher: nn.Module,
    clean: Tensor,
    proxies: ProxySet,
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    progress: ProgressFn,
) -> ProxySet:
    """Invert a trigger generator on ``teacher`` and add it past its gate
    (``dynamic_min_flip``, ``dynamic_min_targets``); ``dynamic_record`` says what was
    found. The proxy images are re-stamped as :func:`_add_permutation_trigger` does.

    It also runs where the permutation trigger in use is a whole-image blend restart, and
    past its stricter gate replaces it: the blend restart's gate (5 of 10 classes) also
    passed a partial collapse on InputAware all-to-all's synthetic images (session 18,
    explore-purify.md 4w), whose per-image trigger the dynamic search finds."""
    assert config.dynamic is not None and proxies.inversion is not None
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 950)
    dyn = dynamic_inversion(
        teacher, clean, config.dynamic, mean=mean, std=std, generator=gen, progress=progress
    )
    record = _gate(dyn, config.dynamic_min_flip, config.dynamic_min_targets)
    out = dataclasses.replace(proxies, dynamic_record=record)
    if not record["used"]:
        return out
    out.dynamic_generator = dyn.generator
    if _permutation_used(out):  # a blend restart's find gives way
        assert out.permutation_record is not None
        out.permutation_record = {**out.permutation_record, "used": False}
        out.permutation_record["replaced_by"] = "dynamic"
        out.extra_triggers = None
    return _restamped(out, clean, config, mean, std, seed_offset=951)


def _add_warp_trigger(
    teacher: nn.Module,
    clean: Tensor,
    proxies: ProxySet,
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    progress: ProgressFn,
) -> ProxySet:
    """Invert one warp per class on ``teacher`` and add the furthest-reaching one past its
    gate (``warp_min_reach``); ``warp_record`` says what was found. The proxy images are
    re-stamped as :func:`_add_permutation_trigger` does."""
    assert config.warp is not None and proxies.inversion is not None
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 970)
    found = warp_inversion(
        teacher, clean, config.warp, mean=mean, std=std, generator=gen, progress=progress
    )
    reach = found.success[found.suspected]
    passed = reach >= config.warp_min_reach
    record = {
        "suspected_target": found.suspected,
        "reach": reach,
        "success": found.success,
        "anomaly_index": found.anomaly_index,
        "max_shift": config.warp.max_shift,
        "passed": passed,  # the gate, whether or not the warp is then used
        "used": passed,
    }
    # a reused ProxySet (the next ratio's run) carries no warp of an earlier run's config
    out = dataclasses.replace(
        proxies, warp_record=record, cleaning_warp=None, warp_field=None, inverted_dropped=False
    )
    if not passed:
        return out
    record["use"] = config.warp_use
    field_ = found.fields[found.suspected]
    named = proxies.inversion.suspected_target
    if config.warp_use in ("cleaning", "both"):
        if config.warp_cleaning_other_class and found.suspected == named:
            record["cleaning"] = (
                f"not driven: the warp names class {named}, as Neural Cleanse does, "
                "so the inverted trigger's cleaning stands (warp_cleaning_other_class)"
            )
        else:
            out.cleaning_warp = field_
    misnamed = out.cleaning_warp is not None and found.suspected != named
    if misnamed and config.misnamed_inverted != "keep":
        # Neural Cleanse's class is a natural one: unlearning its trigger teaches the
        # student to avoid that class
        out.inverted_dropped = True
        record["used"] = True
        left_out = f"Neural Cleanse's trigger (class {named}) left out of the stamps"
        if config.misnamed_inverted == "warp":
            out.warp_field = field_
            left_out += ", the warp unlearnt in its place"
        bare = _nothing_to_unlearn(out)
        record["inverted"] = f"{left_out} (misnamed_inverted)" + (
            "; nothing is left to unlearn" if bare else ""
        )
        return out if bare else _restamped(out, clean, config, mean, std, seed_offset=971)
    if config.warp_use == "cleaning":
        record["used"] = out.cleaning_warp is not None
        return out
    out.warp_field = field_
    return _restamped(out, clean, config, mean, std, seed_offset=971)


def _nothing_to_unlearn(proxies: ProxySet) -> bool:
    """Whether Neural Cleanse's trigger was dropped (``misnamed_inverted``) and no other
    trigger is stamped: fine-tuning then distils the cleaned teacher alone, and the rank
    sensitivity, which compares responses to the proxy images, is skipped."""
    others = (proxies.extra_triggers, proxies.dynamic_generator, proxies.warp_field)
    return proxies.inverted_dropped and all(o is None for o in others)


def named_targets(min_anomaly: float | None, proxies: ProxySet) -> list[int]:
    """The classes a search named as the backdoor target with evidence
    (``PurifyConfig.prior_spare_named``): Neural Cleanse's class where its anomaly index is
    at least ``min_anomaly``, and the class of a warp past its gate (used or not: one that
    agrees with Neural Cleanse is not used for the cleaning, and is the stronger evidence).
    Empty where ``min_anomaly`` is None."""
    if min_anomaly is None:
        return []
    named: set[int] = set()
    inv = proxies.inversion
    if inv is not None and inv.anomaly_index >= min_anomaly:
        named.add(int(inv.suspected_target))
    warp = proxies.warp_record or {}
    if warp.get("passed"):
        named.add(int(warp["suspected_target"]))
    return sorted(named)


def _share_read_early(config: PurifyConfig, proxies: ProxySet) -> bool:
    """Whether a rule before the searches reads the original's share
    (``share_steers_inversion``, ``all_to_one_needs_share``)."""
    early = config.share_steers_inversion or config.all_to_one_needs_share
    return early and config.prior_name_share is not None and proxies.inversion is not None


def _reads_original(config: PurifyConfig, proxies: ProxySet) -> bool:
    """Whether any stage reads the original model's logits on the synthetic images: the
    rules before the searches, the cleaning's backoff (the share names its targets), or the
    class-prior correction's share naming and reference."""
    prior = config.prior_correction > 0 and (
        config.prior_reference == "original"
        or config.prior_name_share is not None
        or config.prior_unnamed_ridge is not None
    )
    backoff = (
        config.cleaning_backoff
        and config.teacher_cleaning is not None
        and config.prior_name_share is not None
    )
    return prior or backoff or _share_read_early(config, proxies)


def _share_steer(
    proxies: ProxySet, by_share: tuple[list[int], Tensor] | None, config: PurifyConfig
) -> tuple[int, float] | None:
    """The class (and its share) that takes Neural Cleanse's place as the suspected target
    (``PurifyConfig.share_steers_inversion``), or None where it keeps its place."""
    inv = proxies.inversion
    if not config.share_steers_inversion or inv is None or by_share is None:
        return None
    if inv.anomaly_index >= config.proxy.inversion.anomaly_threshold:
        return None
    named, share = by_share
    if len(named) != 1 or named[0] == inv.suspected_target or named[0] not in inv.classes:
        return None
    return named[0], float(share[named[0]])


def _steer_inversion(
    clean: Tensor,
    proxies: ProxySet,
    steered: tuple[int, float],
    config: PurifyConfig,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> tuple[ProxySet, dict[str, Any]]:
    """The proxies re-stamped with the inverted trigger of the share's class in place of
    Neural Cleanse's, and the record of the change (``PurifyConfig.share_steers_inversion``).
    Where a warp passed its gate it is the stronger evidence, and its own rules (the
    cleaning it drives, ``misnamed_inverted``) have already weighed Neural Cleanse's class:
    the proxies stay as they are (WaNet all-to-one at width 16, steered all the same: 86.95 /
    1.90 -> 52.30 / 62.75 on 2,000 test images, explore-purify.md 4ag)."""
    assert proxies.inversion is not None
    inv, (target, share) = proxies.inversion, steered
    record: dict[str, Any] = {
        "neural_cleanse": inv.suspected_target,
        "anomaly_index": round(inv.anomaly_index, 4),
        "target": target,
        "share": round(share, 4),
    }
    warp = proxies.warp_record or {}
    if warp.get("passed"):
        record["skipped"] = f"a warp past its gate names class {warp['suspected_target']}"
        return proxies, record
    index = inv.classes.index(target)
    moved = dataclasses.replace(
        inv, suspected_target=target, anomaly_index=inv.anomaly_indices[index]
    )
    out = dataclasses.replace(proxies, inversion=moved, suspected_target=target)
    return _restamped(out, clean, config, mean, std, seed_offset=973), record


def shared_targets(original_share: Tensor | None, above: float | None) -> list[int]:
    """The classes named as the target by the original model's mean softmax share on the
    clean synthetic images (``PurifyConfig.prior_name_share``): those given more than
    ``above`` times the uniform share. An all-to-one backdoor's target draws synthetic
    images that are no class's in particular (explore-purify.md 4ae). Empty where either
    is None."""
    if original_share is None or above is None:
        return []
    bar = above / original_share.numel()
    return [int(c) for c in torch.nonzero(original_share > bar).flatten().tolist()]


def _stamp_of(
    config: PurifyConfig,
    proxies: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> StampFn | None:
    """The input-agnostic trigger behind ``proxies`` as a stamp function, if it has one."""
    if proxies.inversion is not None:
        masks, patterns = _stamped_triggers(config, proxies)
        return _with_warp(_with_dynamic(masks, patterns, proxies, mean, std), proxies, mean, std)
    if proxies.universal is not None:
        return perturbation_stamp(proxies.universal, mean=mean, std=std)
    return None


def _apart_shape(config: PurifyConfig, proxies: ProxySet) -> str | None:
    """``"blend"`` or ``"patch"`` where the permutation trigger in use is a whole-image blend
    or a learned mask concentrated in a patch (``permutation_patch_peak``), else ``"warp"``
    where a warp trigger is in use, else None: the trigger fine-tuning may unlearn apart."""
    record = proxies.permutation_record or {}
    if record.get("used"):
        if record.get("blend"):
            return "blend"
        if record.get("peak_share", 0.0) >= config.permutation_patch_peak:
            return "patch"
    return "warp" if proxies.warp_field is not None else None


def _apart_trigger_settings(config: PurifyConfig, proxies: ProxySet) -> PurifyConfig:
    """``config`` with ``permutation_blend_*`` / ``permutation_patch_*`` / ``warp_*`` as the
    fine-tuning's apart settings (``all_to_all_*``) where the trigger in use is a blend / a
    patch / a warp."""
    shape = _apart_shape(config, proxies)
    if shape is None:
        return config
    batch, weight = {
        "blend": (config.permutation_blend_batch, config.permutation_blend_weight),
        "patch": (config.permutation_patch_batch, config.permutation_patch_weight),
        "warp": (config.warp_batch, config.warp_weight),
    }[shape]
    if batch is None and weight is None:
        return config
    ft = config.finetune
    ft = dataclasses.replace(
        ft,
        all_to_all_batch=ft.all_to_all_batch if batch is None else batch,
        all_to_all_weight=ft.all_to_all_weight if weight is None else weight,
    )
    return dataclasses.replace(config, finetune=ft)


def _splits_all_to_all(config: PurifyConfig) -> bool:
    """Whether fine-tuning stamps the all-to-all triggers apart from the others
    (``FinetuneConfig.all_to_all_batch`` or ``all_to_all_weight`` given)."""
    ft = config.finetune
    return ft.all_to_all_batch is not None or ft.all_to_all_weight is not None


def _finetune_stamps(
    config: PurifyConfig,
    proxies: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> tuple[StampFn | None, StampFn | None]:
    """The stamps fine-tuning unlearns: ``(_stamp_of(...), None)``, or where
    :func:`_splits_all_to_all`, the inverted per-class triggers and the all-to-all ones
    (permutation, dynamic) that passed their gates as two stamps."""
    if not _splits_all_to_all(config) or proxies.inversion is None:
        return _stamp_of(config, proxies, mean, std), None
    (inv_masks, inv_patterns), (perm_masks, perm_patterns) = _split_triggers(config, proxies)
    inverted = None
    if inv_masks.shape[0]:
        inverted = trigger_stamp(inv_masks, inv_patterns, mean=mean, std=std)
    a2a = None
    if perm_masks.shape[0] or proxies.dynamic_generator is not None:
        a2a = _with_dynamic(perm_masks, perm_patterns, proxies, mean, std)
    # the warp (an all-to-one trigger) goes apart only where it is what the split is for
    if _apart_shape(config, proxies) == "warp":
        a2a = _with_warp(a2a, proxies, mean, std)
    else:
        inverted = _with_warp(inverted, proxies, mean, std)
    return inverted, a2a


def _split_triggers(
    config: PurifyConfig, proxies: ProxySet
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """:func:`_stamped_triggers` as two ``(masks, patterns)`` pairs: the inverted per-class
    triggers, then the permutation triggers (``extra_triggers``; none where it failed)."""
    masks, patterns = _stamped_triggers(config, proxies)
    n_perm = 0 if proxies.extra_triggers is None else int(proxies.extra_triggers[0].shape[0])
    n_inv = masks.shape[0] - n_perm
    return (masks[:n_inv], patterns[:n_inv]), (masks[n_inv:], patterns[n_inv:])


def _with_dynamic(
    masks: Tensor,
    patterns: Tensor,
    proxies: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> StampFn | None:
    """A stamp putting one of the triggers ``masks``, ``patterns`` on each image, or, where
    the proxies carry a dynamic trigger generator, one of the two families at random; None
    where there is neither (Neural Cleanse's trigger dropped, nothing else found)."""
    stamps = [trigger_stamp(masks, patterns, mean=mean, std=std)] if masks.shape[0] else []
    if proxies.dynamic_generator is not None:
        stamps.append(dynamic_stamp(proxies.dynamic_generator, mean=mean, std=std))
    return mixed_stamp(stamps) if stamps else None


def _with_warp(
    stamp: StampFn | None,
    proxies: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> StampFn | None:
    """``stamp``, or where the proxies carry a warp trigger, it or the warp at random."""
    if proxies.warp_field is None:
        return stamp
    warp = warp_stamp(proxies.warp_field, mean=mean, std=std)
    return warp if stamp is None else mixed_stamp([stamp, warp])


def _warp_unused(config: PurifyConfig, proxies: ProxySet) -> str | None:
    """Why the warp search is skipped although Neural Cleanse named no all-to-one target,
    or None: the dynamic (input-aware all-to-all) trigger passed its gate (unless
    ``warp_beside_all_to_all``). That gate (>= 60% of the images moved onto >= 8 classes)
    passed only on InputAware all-to-all, whose backdoor it then is, and the warp search
    only cost time there (32 s of 354, 2 threads of a 2-core EPYC,
    bench/results/purify-time-s22-ia.md). The permutation trigger's looser gate is no such
    sign: it passed on WaNet all-to-one, whose warp drives the cleaning (explore-purify.md
    4aa), so the search still runs beside it.
    """
    if config.warp_beside_all_to_all or proxies.dynamic_generator is None:
        return None
    return "the dynamic all-to-all trigger passed its gate (warp_beside_all_to_all=false)"


def _all_to_all_only(config: PurifyConfig, proxies: ProxySet) -> bool:
    """Whether an all-to-all trigger passed its gate and replaces the inverted per-class
    ones (``PurifyConfig.inverted_beside_all_to_all``)."""
    found = proxies.extra_triggers is not None or proxies.dynamic_generator is not None
    return found and not config.inverted_beside_all_to_all


def _stamped_triggers(config: PurifyConfig, proxies: ProxySet) -> tuple[Tensor, Tensor]:
    """Masks and patterns of the triggers stamped in fine-tuning: the inverted ones chosen by
    ``config.proxy.inversion.use`` (unless :func:`_all_to_all_only`), plus the permutation
    trigger when it passed its gate."""
    inv = proxies.inversion
    assert inv is not None
    idx = torch.tensor(
        chosen_triggers(inv, config.proxy.inversion.use, config.proxy.inversion.anomaly_threshold)
    )
    if _all_to_all_only(config, proxies) or proxies.inverted_dropped:
        idx = idx[:0]
    masks, patterns = inv.masks[idx], inv.patterns[idx]
    if proxies.extra_triggers is not None:
        masks = torch.cat([masks, proxies.extra_triggers[0].to(masks.device)])
        patterns = torch.cat([patterns, proxies.extra_triggers[1].to(patterns.device)])
    return masks, patterns


def _blend_stamp(
    config: PurifyConfig,
    teacher: nn.Module,
    clean: Tensor,
    target: int | None,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    num_classes: int,
) -> tuple[StampFn | None, dict[str, Any]]:
    """The blend proxies of ``config.blend_proxy`` as one stamp, and what they do to the
    original model on the synthetic images (a detection signal of its own: the share of them
    each pattern sends to one class)."""
    c, h, w = clean.shape[1:]
    patterns = []
    if config.blend_proxy in ("mean_diff", "both") and target is not None:
        d = mean_difference_pattern(teacher, clean, target, mean=mean, std=std)
        if d is not None:
            patterns.append(d[None])
    if config.blend_proxy in ("noise", "both") and config.blend_noise > 0:
        gen = torch.Generator(device="cpu").manual_seed(config.seed + 7)
        patterns.append(torch.rand(config.blend_noise, c, h, w, generator=gen).to(clean.device))
    if not patterns:
        return None, {"kind": config.blend_proxy, "patterns": 0}
    p = torch.cat(patterns)
    masks, p = blend_triggers(p, config.blend_alpha, (h, w))
    probe = clean[: config.detect_images]
    shares = []
    for k in range(p.shape[0]):
        pred = predict(teacher, apply_trigger(probe, masks[k], p[k], mean=mean, std=std))
        hist = class_histogram(pred, num_classes)
        top = max(range(num_classes), key=lambda j: hist[j])
        shares.append({"top_class": top, "share": hist[top] / max(len(pred), 1)})
    info = {"kind": config.blend_proxy, "patterns": p.shape[0], "alpha": config.blend_alpha}
    info["original_model_top_class"] = shares
    return trigger_stamp(masks, p, mean=mean, std=std), info


def _stamp_refresher(
    config: PurifyConfig,
    clean: Tensor,
    first: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    num_classes: int,
    blend: StampFn | None = None,
) -> StampRefreshFn:
    """Re-invert the suspected target's trigger on the student; keep every trigger so far
    (the first stamp's: the chosen inverted triggers and the permutation trigger) and the
    ``blend`` stamp beside them, as the first stamp mixed them."""
    assert first.inversion is not None
    target = first.inversion.suspected_target
    if _splits_all_to_all(config):  # the all-to-all triggers are stamped apart, unchanged
        (masks0, patterns0), _ = _split_triggers(config, first)
        first = dataclasses.replace(first, dynamic_generator=None)
    else:
        masks0, patterns0 = _stamped_triggers(config, first)
    masks, patterns = [masks0], [patterns0]
    inv_cfg = dataclasses.replace(config.proxy.inversion, classes=(target,))

    def refresh(student: nn.Module, epoch: int) -> StampFn:
        gen = torch.Generator(device="cpu").manual_seed(config.seed + 1000 + epoch)
        inv = trigger_inversion(
            student, clean, inv_cfg, mean=mean, std=std, num_classes=num_classes, generator=gen
        )
        masks.append(inv.masks)
        patterns.append(inv.patterns)
        stamp = _with_dynamic(torch.cat(masks), torch.cat(patterns), first, mean, std)
        assert stamp is not None  # the re-inverted trigger is among them
        return mixed_stamp([stamp, blend]) if blend is not None else stamp

    return refresh


def _refresher(
    config: PurifyConfig,
    clean: Tensor,
    first: ProxySet,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    num_classes: int,
):  # noqa: ANN202 - returns the finetune refresh callback
    """Re-attack the current student every few epochs; labels stay the teacher's clean ones."""
    proxy_cfg = config.proxy
    if proxy_cfg.kind == "trigger_inversion" and first.inversion is not None:
        # Re-invert only the suspected class (cheap) on the student
        proxy_cfg = dataclasses.replace(
            proxy_cfg,
            inversion=dataclasses.replace(
                proxy_cfg.inversion, classes=(first.inversion.suspected_target,), use="suspected"
            ),
        )

    def refresh(student: nn.Module, epoch: int) -> tuple[Tensor, Tensor]:
        cfg = dataclasses.replace(proxy_cfg, seed=config.seed + epoch)
        new = make_proxies(student, clean, cfg, mean=mean, std=std, num_classes=num_classes)
        # keep the teacher's clean labels and the first proxies, so nothing is forgotten
        return torch.cat([first.images, new.images]), torch.cat([first.labels, first.labels])

    return refresh
