"""The job methods and advanced settings the API accepts.

Copies of ``cnc_core.job.METHODS`` and ``cnc_core.job.advanced_knob_names()``: the API never
imports ``cnc_core`` (no torch in its image), and ``tests/test_import_rules.py`` asserts the
copies equal the library's, so a misspelt setting is a 422 at submit, not a failed job.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("cnc", "cnc-paper", "clp", "compress")

#: Names accepted in a job's ``advanced`` settings (values are checked by the worker).
ADVANCED_KNOBS: frozenset[str] = frozenset(
    {
        # job
        "latency_batches",
        "latency_repeats",
        "measure_latency",
        # compression (CompressConfig)
        "allocation",
        "decompose_linear",
        "exclude",
        "keep_dense_if_larger",
        "mac_allocation",
        "mac_ratio",
        "min_layer_share",
        "rank_multiple",
        "scale_stem",
        "scaling",
        "t_scale",
        # purification (cnc_core.purify.pipeline.KNOBS)
        "allocation_spectra",
        "augment",
        "batch_size",
        "blend_alpha",
        "blend_noise",
        "blend_proxy",
        "bn_mode",
        "class_weight",
        "cleaning",
        "cleaning_all_to_all",
        "cleaning_max_flip",
        "cleaning_max_fraction",
        "cleaning_min_agreement",
        "cleaning_min_mask_growth",
        "cleaning_rounds",
        "cleaning_u",
        "channels_last",
        "clp_compress",
        "clp_u",
        "detect",
        "drop_disputed",
        "early_stopping",
        "epochs",
        "feature_depth",
        "feature_weight",
        "flip",
        "inversion_l1",
        "inverted_beside_all_to_all",
        "inversion_steps",
        "inversion_use",
        "kd_weight",
        "lr",
        "num_images",
        "online_proxies",
        "optimizer",
        "patience",
        "pgd_eps",
        "pgd_steps",
        "proxy",
        "proxy_labels",
        "proxy_weight",
        "recalibrate",
        "recal_stamped",
        "refit",
        "refit_damping",
        "refit_weighting",
        "permutation",
        "permutation_steps",
        "permutation_restarts",
        "permutation_min_flip",
        "permutation_min_targets",
        "permutation_max_anomaly",
        "dynamic",
        "dynamic_steps",
        "dynamic_l1",
        "dynamic_spread",
        "dynamic_min_flip",
        "dynamic_min_targets",
        "refresh_every",
        "sensitivity",
        "sensitivity_action",
        "sensitivity_u",
        "shift",
        "stamp_fraction",
        "synthesis_batch_size",
        "synthesis_iterations",
        "synthesis_lr",
        "target_class_weight",
        "target_images",
        "target_max_flip",
        "temperature",
        "tv_weight",
        "universal_eps",
        "weight_decay",
    }
)

#: The string-valued advanced settings and the values each accepts (a copy of
#: ``cnc_core.job.advanced_knob_choices()``): a value outside them is refused at submission.
KNOB_CHOICES: dict[str, tuple[str, ...]] = {
    "allocation": ("energy", "full", "keep_ratio", "threshold"),
    "mac_allocation": ("tilted", "shared"),
    "scaling": ("clip", "literal", "none", "proportional"),
    "proxy": ("pgd", "universal", "trigger_inversion"),
    "inversion_use": ("suspected", "anomalous", "all"),
    "bn_mode": ("eval", "train"),
    "optimizer": ("adam", "sgd"),
    "proxy_labels": ("hard", "soft"),
    "sensitivity_action": ("prune", "scale"),
    "blend_proxy": ("none", "mean_diff", "noise", "both"),
    "refit_weighting": ("rms", "none"),
    "allocation_spectra": ("weight", "response"),
}
