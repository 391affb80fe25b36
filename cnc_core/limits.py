"""Bounds on the advanced settings a job may set: type and range of every non-string knob.

An uploaded job's ``advanced`` settings come from an untrusted client. A size knob left
unbounded invites a runaway job (``num_images: 10**9`` asks for terabytes; ``epochs:
10**6`` holds a GPU until the time limit), and a value of the wrong type or sign fails
deep in a stage with an error that names no setting. Every knob that is not a
string choice (those are ``advanced_knob_choices``) has a :class:`Limit` here, checked by
:func:`check_knob` before any work starts, with an error that names the knob and its
range. ``app.methods.KNOB_LIMITS`` is a copy (the API never imports the library; a test
asserts the two are equal), so a bad value is a 422 at submission, not a failed job.

The ranges are generous: they admit every value the benchmarks and the explorations used
and stop only what is nonsense (a negative weight, a share above 1) or runaway. They are
per setting; across settings, :func:`check_image_budget` bounds the synthetic image set
(``num_images`` x ``in_chans`` x ``input_size``^2), the largest tensor every stage holds
copies of. Activations of a large model at a large batch are not bounded here: such a job
fails when the worker runs out, and the job's time limit (``worker.runner``) bounds the
compute. Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple


class Limit(NamedTuple):
    """``kind``: ``int``, ``float``, ``bool``, ``ints`` (a list of ints) or ``strs``.

    ``low`` / ``high``: inclusive bounds of the value (of each element for ``ints``; of
    each string's length for ``strs``), ``None`` for none. ``nullable``: ``null`` is
    accepted (the knob's "off"). ``open_low``: ``low`` itself is refused (strictly
    positive). ``max_items``: the longest list.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    open_low: bool = False
    max_items: int = 0


BOOL = Limit("bool")
SWITCH = Limit("bool", nullable=True)  # a stage switched on (true) or off (false or null)
SHARE = Limit("float", 0.0, 1.0)  # a fraction of images, channels or classes
WEIGHT = Limit("float", 0.0, 1e6)  # a loss weight or penalty
POSITIVE = Limit("float", 0.0, 1e3, open_low=True)  # a rate, scale or temperature
OUTLIER_BAR = Limit("float", 0.0, 1e3)  # u of median + u * MAD (or mean + u * std)
STEPS = Limit("int", 1, 100_000)  # optimisation steps of one search
COUNT = Limit("int", 0, 1_000)  # rounds, restarts, epochs, corrections
# A gate's bar, compared with a measured share or ratio: any finite number, since a bar
# outside [0, 1] is how a run forces a gate always open or always shut
GATE = Limit("float", -1e12, 1e12)
NULLABLE_GATE = GATE._replace(nullable=True)

KNOB_LIMITS: dict[str, Limit] = {
    # job (cnc_core.job.JOB_KNOBS)
    "latency_repeats": Limit("int", 1, 10_000),
    "latency_batches": Limit("ints", 1, 4_096, max_items=8),
    "measure_latency": BOOL,
    # compression (cnc_core.compress.CompressConfig)
    "decompose_linear": BOOL,
    "exclude": Limit("strs", 1, 512, max_items=1_024),
    "keep_dense_if_larger": BOOL,
    "mac_ratio": Limit("float", 1.0, 1e3, nullable=True),
    "min_layer_share": Limit("float", 0.0, 0.999),  # 1 would keep every layer dense
    "rank_multiple": Limit("int", 1, 1_024),
    "scale_stem": BOOL,
    "t_scale": POSITIVE,
    # purification: synthesis
    "num_images": Limit("int", 1, 32_768),
    "synthesis_batch_size": Limit("int", 1, 4_096),
    "synthesis_iterations": STEPS,
    "synthesis_lr": POSITIVE,
    "class_weight": WEIGHT,
    "tv_weight": WEIGHT,
    "channels_last": BOOL,
    # detection and proxies
    "detect": BOOL,
    "pgd_eps": SHARE,
    "pgd_steps": STEPS,
    "universal_eps": SHARE,
    "inversion_steps": STEPS,
    "inversion_l1": WEIGHT,
    "online_proxies": BOOL,
    "refresh_every": COUNT,
    "blend_alpha": SHARE,
    "blend_noise": Limit("int", 0, 1_024),
    "permutation": SWITCH,
    "permutation_steps": STEPS,
    "permutation_restarts": Limit("int", 0, 64),  # 0: the blend restarts alone
    "permutation_min_flip": GATE,
    "permutation_min_targets": GATE,
    "permutation_any_restart": BOOL,
    "permutation_all_passing": BOOL,
    "permutation_max_anomaly": NULLABLE_GATE,
    "permutation_blend_restarts": Limit("int", 0, 64),
    "permutation_blend_alpha": SHARE,
    "permutation_blend_images": Limit("int", 1, 4_096, nullable=True),
    "permutation_blend_weight": Limit("float", 0.0, 1e6, nullable=True),
    "permutation_patch_peak": GATE,
    "permutation_patch_weight": Limit("float", 0.0, 1e6, nullable=True),
    "dynamic": SWITCH,
    "dynamic_steps": STEPS,
    "dynamic_l1": WEIGHT,
    "dynamic_spread": WEIGHT,
    "dynamic_min_flip": GATE,
    "dynamic_min_targets": GATE,
    "warp": SWITCH,
    "warp_steps": STEPS,
    "verify": SWITCH,
    "verify_threshold": GATE,
    "verify_min_growth": Limit("float", 0.0, 1e3),
    "verify_blend_kept": Limit("float", 0.0, 1e3),
    "verify_steps": STEPS,
    "warp_max_shift": Limit("float", 0.0, 64.0, open_low=True),  # pixels
    "warp_min_reach": GATE,
    "warp_weight": Limit("float", 0.0, 1e6, nullable=True),
    "warp_cleaning_u": Limit("float", 0.0, 1e3, nullable=True, open_low=True),
    "warp_beside_all_to_all": BOOL,
    "warp_cleaning_other_class": BOOL,
    "inverted_beside_all_to_all": BOOL,
    # teacher cleaning, rank sensitivity, refit, CLP
    "cleaning": SWITCH,
    "cleaning_u": OUTLIER_BAR,
    "cleaning_max_fraction": SHARE,
    "cleaning_rounds": COUNT,
    "cleaning_max_flip": NULLABLE_GATE,
    "cleaning_min_agreement": GATE,
    "cleaning_backoff": BOOL,
    "cleaning_min_mask_growth": NULLABLE_GATE,
    "cleaning_min_reach_cut": NULLABLE_GATE,
    "cleaning_all_to_all": BOOL,
    "target_images": Limit("int", 0, 32_768),
    "target_class_weight": WEIGHT,
    "target_max_flip": GATE,
    "drop_disputed": BOOL,
    "sensitivity": SWITCH,
    "sensitivity_u": OUTLIER_BAR,
    "refit": SWITCH,
    "refit_damping": Limit("float", 0.0, 1e3),
    "clp_u": OUTLIER_BAR,
    "clp_compress": BOOL,
    # fine-tuning
    "epochs": COUNT,
    "lr": Limit("float", 0.0, 10.0),  # 0: the weights stay, only BN is re-estimated
    "weight_decay": Limit("float", 0.0, 1.0),
    "batch_size": Limit("int", 1, 4_096),
    "temperature": POSITIVE,
    "kd_weight": WEIGHT,
    "proxy_weight": WEIGHT,
    "feature_weight": WEIGHT,
    "feature_depth": SHARE,
    "all_to_all_weight": Limit("float", 0.0, 1e6, nullable=True),
    "recalibrate": BOOL,
    "early_stopping": BOOL,
    "patience": COUNT,
    "holdout": Limit("float", 0.0, 0.9),
    "augment": BOOL,
    "shift": Limit("int", 0, 7),  # pixels; reflect padding needs less than the side (>= 8)
    "flip": BOOL,
    "mixup": Limit("float", 0.0, 100.0),
    "logit_teacher_share": SHARE,
    "stamp_fraction": SHARE,
    "recal_stamped": SHARE,
    "average_from": COUNT,
    # the class-prior correction (cnc_core.purify.calibrate)
    "prior_correction": COUNT,
    "prior_max_shift": Limit("float", 0.0, 100.0, open_low=True),
    "prior_head_ridge": Limit("float", 0.0, 1e3, nullable=True),
    "prior_unnamed_ridge": Limit("float", 0.0, 1e3, nullable=True),
    "prior_name_share": Limit("float", 0.0, 1e3, nullable=True, open_low=True),
    "share_steers_inversion": BOOL,
    "all_to_one_needs_share": BOOL,
    "prior_avoided_below": Limit("float", 0.0, 1.0, nullable=True, open_low=True),
    "prior_spare_named": NULLABLE_GATE,
}


def _describe(limit: Limit) -> str:
    if limit.kind == "bool":
        return "true or false"
    if limit.kind == "strs":
        return f"a list of at most {limit.max_items} names of 1-{_number(limit.high)} characters"
    left = "(" if limit.open_low else "["
    span = f"{left}{_number(limit.low)}, {_number(limit.high)}]"
    what = {
        "int": f"an integer in {span}",
        "float": f"a number in {span}",
        "ints": f"a list of 1-{limit.max_items} integers in {span}",
    }[limit.kind]
    return f"{what} or null" if limit.nullable else what


def _number(value: float | None) -> str:
    if value is None:
        return "inf"
    return f"{value:g}"


def _in_range(value: float, limit: Limit) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if limit.low is not None and (value < limit.low or (limit.open_low and value == limit.low)):
        return False
    return limit.high is None or value <= limit.high


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fits(value: Any, limit: Limit) -> bool:
    if value is None:
        return limit.nullable
    if limit.kind == "bool":
        return isinstance(value, bool)
    if limit.kind == "int":
        return _is_int(value) and _in_range(value, limit)
    if limit.kind == "float":
        return _is_number(value) and _in_range(value, limit)
    if not isinstance(value, list | tuple) or len(value) > limit.max_items:
        return False
    if limit.kind == "ints":
        return len(value) > 0 and all(_is_int(v) and _in_range(v, limit) for v in value)
    if limit.kind == "strs":
        return all(isinstance(v, str) and _in_range(len(v), limit) for v in value)
    raise ValueError(f"unknown limit kind {limit.kind!r}")


def check_knob(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the knob and its range if ``value`` does not fit it.

    Knobs without a :class:`Limit` (the string choices, checked against their choices
    elsewhere, and unknown names, refused elsewhere) pass.
    """
    limit = KNOB_LIMITS.get(name)
    if limit is not None and not _fits(value, limit):
        raise ValueError(f"advanced setting {name}={value!r} must be {_describe(limit)}")


def check_knobs(knobs: Mapping[str, Any]) -> None:
    """:func:`check_knob` on every item."""
    for name, value in knobs.items():
        check_knob(name, value)


#: The synthetic image set's size in values (``num_images`` x ``in_chans`` x
#: ``input_size``^2) a job may ask for: 2 GiB of float32 per copy, and the stages hold a few
#: copies (the proxies, the stamped batches). The preset's 1,024 images fit up to 418 x 418
#: pixels at 3 channels; 32,768 CIFAR-sized ones fit. ``app.methods`` holds a copy.
MAX_IMAGE_VALUES = 2**29
#: The synthetic images of every preset (``SynthesisConfig.num_images``; a test asserts it).
DEFAULT_NUM_IMAGES = 1024


def check_image_budget(num_images: int, in_chans: int, input_size: int) -> None:
    """Raise ``ValueError`` naming the three settings where the synthetic image set would
    exceed :data:`MAX_IMAGE_VALUES`."""
    values = num_images * in_chans * input_size * input_size
    if values > MAX_IMAGE_VALUES:
        raise ValueError(
            f"num_images x in_chans x input_size^2 = {num_images} x {in_chans} x "
            f"{input_size}^2 = {values:,} values exceeds the synthetic-image budget of "
            f"{MAX_IMAGE_VALUES:,} (2 GiB of float32); lower num_images or input_size"
        )
