"""Every advanced setting is bounded, the bounds admit every preset, and a value outside
them is refused before any work with an error that names the setting and its range."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import pytest

from cnc_core.compress import COMPRESS_KNOBS, CompressConfig
from cnc_core.job import JOB_KNOBS, METHODS
from cnc_core.limits import KNOB_LIMITS, check_knob, check_knobs
from cnc_core.purify import pipeline
from cnc_core.purify.pipeline import KNOBS, PurifyConfig


def _value(config: PurifyConfig, path: tuple[str, ...]) -> Any:
    sections = pipeline._optional_defaults()
    obj: Any = config
    for i, key in enumerate(path):
        if obj is None:  # a switched-off section: its sub-knobs' defaults
            obj = sections[path[0]]
        obj = getattr(obj, key)
        if i == 0 and len(path) == 1 and path[0] in sections:
            return obj is not None  # the switch itself
    return obj


@pytest.mark.parametrize("method", [m for m in METHODS if m != "compress"])
def test_every_preset_value_fits_its_limit(method: str) -> None:
    config = PurifyConfig.for_method(method)
    values = {name: _value(config, path) for name, path in KNOBS.items() if name in KNOB_LIMITS}
    check_knobs(values)  # raises on the first misfit, naming it
    assert len(values) > 80


def test_kind_and_null_match_the_field_type() -> None:
    sections = pipeline._optional_defaults()
    for name, path in KNOBS.items():
        if name not in KNOB_LIMITS or (len(path) == 1 and path[0] in sections):
            continue
        owner: Any = PurifyConfig()
        for key in path[:-1]:
            owner = getattr(owner, key) or sections[key]
        annotation = {f.name: str(f.type) for f in fields(owner)}[path[-1]]
        limit = KNOB_LIMITS[name]
        assert limit.nullable == ("None" in annotation), (name, annotation)
        assert annotation.split(" |")[0] == limit.kind, (name, annotation, limit.kind)


def test_compression_and_job_defaults_fit() -> None:
    defaults = asdict(CompressConfig())
    check_knobs({k: defaults[k] for k in COMPRESS_KNOBS if k in KNOB_LIMITS})
    check_knobs(JOB_KNOBS)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("num_images", 10**9, r"num_images=1000000000 must be an integer in \[1, 32768\]"),
        ("epochs", 2.0, "epochs=2.0 must be an integer"),
        ("epochs", True, "epochs=True must be an integer"),
        ("epochs", None, "epochs=None"),
        ("lr", -0.1, r"lr=-0.1 must be a number in \[0, 10\]"),
        ("temperature", 0, r"temperature=0 must be a number in \(0, 1000\]"),
        ("permutation_restarts", 65, r"must be an integer in \[0, 64\]"),
        ("min_layer_share", 1.0, "min_layer_share=1.0"),
        ("lr", "0.1", "lr='0.1' must be a number"),
        ("holdout", float("nan"), "holdout=nan"),
        ("proxy_weight", float("inf"), "proxy_weight=inf"),
        ("stamp_fraction", 1.5, r"stamp_fraction=1.5 must be a number in \[0, 1\]"),
        ("prior_avoided_below", 0.0, r"in \(0, 1\] or null"),
        ("cleaning", 1, "cleaning=1 must be true or false"),
        ("latency_batches", [], "latency_batches=\\[\\] must be a list of 1-8 integers"),
        ("latency_batches", [1, 10**6], "latency_batches"),
        ("exclude", ["x"] * 2000, "exclude=.* must be a list of at most 1024 names"),
        ("exclude", [""], "exclude"),
    ],
)
def test_out_of_range_values_are_refused_by_name(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_knob(name, value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", 1),  # an int where a float is asked for
        ("lr", 0),  # no step: BN re-estimated only
        ("warp_weight", None),  # nullable: the knob's "off"
        ("cleaning", None),  # a switched section: null is off
        ("exclude", []),
        ("latency_batches", (1, 64)),
        ("mac_ratio", 3),
        ("style", "unknown names are refused elsewhere"),
    ],
)
def test_values_inside_the_limits_pass(name: str, value: Any) -> None:
    check_knob(name, value)


def test_purify_knobs_are_checked_where_they_are_applied() -> None:
    with pytest.raises(ValueError, match="synthesis_iterations=-5 must be an integer"):
        PurifyConfig.from_knobs(method="cnc", knobs={"synthesis_iterations": -5})


def test_the_synthetic_image_budget_spans_settings() -> None:
    """``check_image_budget``: num_images x in_chans x input_size^2 against one bound, the
    preset's image count is the default it assumes, and the API holds the same numbers."""
    from app.methods import DEFAULT_NUM_IMAGES as API_DEFAULT
    from app.methods import MAX_IMAGE_VALUES as API_MAX
    from cnc_core.limits import DEFAULT_NUM_IMAGES, MAX_IMAGE_VALUES, check_image_budget

    check_image_budget(DEFAULT_NUM_IMAGES, 3, 224)  # ImageNet-sized inputs fit the preset
    check_image_budget(32_768, 3, 32)  # the largest image count at CIFAR size fits
    with pytest.raises(ValueError, match=r"4096 x 3 x 224\^2 = 616,562,688 values exceeds"):
        check_image_budget(4096, 3, 224)
    assert (API_MAX, API_DEFAULT) == (MAX_IMAGE_VALUES, DEFAULT_NUM_IMAGES)
    for method in (m for m in METHODS if m != "compress"):
        assert PurifyConfig.for_method(method).synthesis.num_images == DEFAULT_NUM_IMAGES
