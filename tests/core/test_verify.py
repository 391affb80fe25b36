"""The data-free residual check: Neural Cleanse re-run on a (purified) model."""

from __future__ import annotations

import pytest
import torch

from cnc_core.purify.pipeline import purify
from cnc_core.purify.proxies import TriggerInversionConfig, trigger_inversion
from cnc_core.purify.verify import VerifyConfig, residual_check
from tests.core.test_proxies import MEAN, STD, _stats, backdoored_tiny, make_task, poisoned_tiny

CONFIG = VerifyConfig(inversion=TriggerInversionConfig(steps=60, images_per_class=16))


@pytest.fixture(scope="module")
def backdoored() -> torch.nn.Module:
    """Trained in-test: a patch trigger sends 10% of the samples to class 2."""
    return backdoored_tiny(target=2)


def _images() -> torch.Tensor:
    m, s = _stats()
    x, _ = make_task(128, seed=7)  # stand-in for synthetic images
    return (x - m) / s


def test_a_backdoor_left_in_is_flagged_with_its_target(backdoored: torch.nn.Module) -> None:
    rec = residual_check(backdoored, _images(), CONFIG, acted_on=2, mean=MEAN, std=STD)
    assert rec["verdict"] == "outlier"
    assert rec["class"] == 2 and rec["acted_on"] == 2
    assert rec["anomaly_index"] >= CONFIG.anomaly_threshold
    assert rec["acted_on_anomaly_index"] == rec["anomaly_index"]
    assert len(rec["mask_norms"]) == len(rec["anomaly_indices"]) == len(rec["success"]) == 6


def test_a_clean_model_has_no_outlier_and_its_masks_are_compared_with_the_original(
    backdoored: torch.nn.Module,
) -> None:
    images = _images()
    clean = poisoned_tiny(lambda y: y, share=0.0)
    original = trigger_inversion(
        backdoored,
        images,
        CONFIG.inversion,
        mean=MEAN,
        std=STD,
        generator=torch.Generator().manual_seed(0),
    )
    rec = residual_check(clean, images, CONFIG, original=original, mean=MEAN, std=STD)
    assert rec["verdict"] == "none"
    assert rec["anomaly_index"] < CONFIG.anomaly_threshold
    # the backdoored model's target needed a tiny mask; the clean model's needs far more
    growth = rec["mask_growth"]
    assert max(range(6), key=growth.__getitem__) == 2 and growth[2] > 1.2


def test_the_check_is_seeded_and_leaves_the_model_unchanged(backdoored: torch.nn.Module) -> None:
    net = backdoored
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = _images()
    runs = [residual_check(net, images, CONFIG, seed=3, mean=MEAN, std=STD) for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training


@pytest.mark.parametrize("threshold", [0.0, 1e9])
def test_the_threshold_decides_the_verdict(backdoored: torch.nn.Module, threshold: float) -> None:
    config = VerifyConfig(inversion=CONFIG.inversion, anomaly_threshold=threshold)
    rec = residual_check(backdoored, _images(), config, mean=MEAN, std=STD)
    assert rec["verdict"] == ("outlier" if threshold == 0.0 else "none")


def test_the_cnc_preset_checks_the_purified_model_and_the_report_says_so() -> None:
    from cnc_core.report_md import render_report
    from tests.core.test_purify import _config, _model

    res = purify(_model(), _config("cnc"), mean=0.5, std=0.25, input_shape=(3, 16, 16))
    rec = res.detection["verify"]
    assert rec["verdict"] in ("outlier", "none") and rec["acted_on"] == res.suspected_target
    assert "verify" in res.timings
    page = render_report({"detection": res.detection})
    assert "## Residual check" in page
    off = purify(
        _model(), _config("cnc", verify=False), mean=0.5, std=0.25, input_shape=(3, 16, 16)
    )
    assert "verify" not in off.detection and "verify" not in off.timings


def test_the_report_warns_where_a_class_is_still_an_outlier() -> None:
    from cnc_core.report_md import render_report

    rec = {
        "verdict": "outlier",
        "class": 3,
        "anomaly_index": 3.4,
        "anomaly_threshold": 2.0,
        "mask_norms": [90.0, 80.0, 85.0, 20.0],
        "success": [0.9, 0.9, 0.9, 1.0],
        "mask_growth": [1.0, 1.1, 0.9, 1.05],
        "acted_on": 3,
    }
    page = render_report({"detection": {"verify": rec}})
    assert "removal unconfirmed" in page
    assert "the backdoor the purification treated (class 3) may remain" in page
    assert "1.05x its size on the original" in page
    other = render_report({"detection": {"verify": {**rec, "acted_on": 1}}})
    assert "a backdoor to class 3 may remain (the purification treated class 1" in other
