"""Rank-level sensitivity and the purify pipeline: planted component found, seeded, cancellable."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cnc_core.compress import CompressConfig
from cnc_core.layers import Tucker2Conv2d
from cnc_core.models import create_model
from cnc_core.progress import Cancelled
from cnc_core.purify.pipeline import KNOBS, METHODS, PurifyConfig, disputed_images, purify
from cnc_core.purify.proxies import (
    PROXY_KINDS,
    ProxySet,
    apply_trigger,
    make_proxies,
    proxies_from_inversion,
)
from cnc_core.purify.sensitivity import (
    SensitivityConfig,
    apply_suppression,
    rank_components,
    strongest_first,
    suppress_sensitive_ranks,
)
from cnc_core.report_md import render_report

SMALL = dict(
    num_images=32,
    synthesis_iterations=3,
    synthesis_batch_size=16,
    epochs=2,
    batch_size=16,
    inversion_steps=3,
    pgd_steps=2,
    permutation_steps=3,
    dynamic_steps=3,
    warp_steps=3,
    verify_steps=3,
)


def _tucker_net() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = Tucker2Conv2d(conv, (6, 3))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p).abs() * 0.5)  # positive: components see clean input
        # mode-2 component 0 reads channel 0 minus channel 1: silent on clean images
        # (channels equal), loud on proxies (a patch on channel 0 only)
        layer.first.weight[0] = 0.0
        layer.first.weight[0, 0] = 1.0
        layer.first.weight[0, 1] = -1.0
    return nn.Sequential(layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _planted_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images (channels equal) and the same with a patch on channel 0 only: what
    :func:`_tucker_net`'s planted component reads."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(40, 1, 8, 8, generator=g).repeat(1, 3, 1, 1)
    proxies = clean.clone()
    proxies[:, 0, -3:, -3:] = 1.5
    return clean, proxies


def test_sensitivity_prunes_planted_trigger_component() -> None:
    net = _tucker_net()
    clean, proxies = _planted_pair()
    assert set(rank_components(net)) == {"0.core", "0.first"}
    res = suppress_sensitive_ranks(net, clean, proxies, SensitivityConfig(u=3.0))
    assert res.suppressed["0.first"] == [0]
    assert res.scores["0.first"][0] > 10 * max(res.scores["0.first"][1:])
    assert torch.all(net[0].first.weight[0] == 0)
    assert torch.all(net[0].first.weight[1:] != 0)
    net2 = _tucker_net()
    res2 = suppress_sensitive_ranks(net2, clean, proxies, SensitivityConfig(action="scale"))
    assert 0 < res2.factors["0.first"][0] < 0.1


def _model() -> nn.Module:
    torch.manual_seed(3)
    net = create_model("simple_cnn", num_classes=4, in_chans=3, width=8)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(16, 3, 16, 16))
    return net.eval()


def _config(method: str, **extra: object) -> PurifyConfig:
    knobs = dict(SMALL, **extra) if method.startswith("cnc") else {}
    return PurifyConfig.from_knobs(
        method=method, compress=CompressConfig(ratio=1.5), seed=0, knobs=knobs
    )


def test_purify_is_deterministic_under_a_seed() -> None:
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    outs = []
    for _ in range(2):
        res = purify(
            model, _config("cnc", refresh_every=1), mean=0.5, std=0.25, input_shape=(3, 16, 16)
        )
        outs.append(res.model(x))
        assert res.suspected_target is not None and res.compress is not None
        assert res.compress.params_after < res.compress.params_before
        assert "adversarial_before" in res.detection["histograms"]
        assert res.detection["teacher_cleaning"]["rounds"]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(model(x), outs[0])  # the input model is untouched, the output new


def test_cleaning_that_breaks_the_model_is_undone() -> None:
    """A cleaning round below the agreement guard is undone: same result as no cleaning."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    loose = dict(detect=False, cleaning_u=0.5, cleaning_max_fraction=0.5)  # prune something
    guarded = purify(model, _config("cnc", **loose, cleaning_min_agreement=1.01), **kw)
    rounds = guarded.detection["teacher_cleaning"]["rounds"]
    # Neural Cleanse names the target at anomaly index 2.19, so the preset's backoff tries
    # to trim the round; no part of it meets a bar over 1
    assert rounds[0]["backoff"]["planned"] > 0 and rounds[0]["suppressed"] == 0
    assert rounds[0]["undone"] == "agreement"
    assert guarded.detection["teacher_cleaning"]["rounds_applied"] == 0
    assert guarded.detection["teacher_cleaning"]["agreement_with_original"] == 1.0
    assert guarded.detection["finetune_selection"].startswith("last epoch")
    # the trigger is untrusted: the same as no cleaning, keeping the last epoch
    plain = purify(model, _config("cnc", **loose, cleaning=False, early_stopping=False), **kw)
    assert torch.allclose(guarded.model(x), plain.model(x), atol=1e-6)
    kept = purify(
        model,
        _config(
            "cnc",
            **loose,
            cleaning_min_agreement=0.0,
            cleaning_min_mask_growth=None,
            cleaning_max_flip=None,
        ),
        **kw,
    )
    assert kept.detection["teacher_cleaning"]["rounds_applied"] == 1
    assert kept.detection["finetune_selection"] == "best epoch"
    assert not torch.allclose(kept.model(x), plain.model(x), atol=1e-6)


#: Cleaning knobs for the guard tests: a tiny model's round prunes channels and every
#: guard but the one under test is off.
LOOSE_CLEANING = dict(
    detect=False,
    cleaning_u=0.5,
    cleaning_max_fraction=0.5,
    cleaning_min_agreement=0,
    cleaning_max_flip=None,
)


def test_a_round_that_finds_no_outlier_is_kept_not_undone() -> None:
    """A round with nothing past the outlier bar leaves the model as it was and is kept
    (the trigger stays trusted); only a round the backoff trims to nothing is undone."""
    res = purify(_model(), _config("cnc"), mean=0.5, std=0.25, input_shape=(3, 16, 16))
    cleaning = res.detection["teacher_cleaning"]
    rnd = cleaning["rounds"][0]
    assert rnd["suppressed"] == 0 and rnd["agreement"] == 1.0
    assert "undone" not in rnd and "backoff" not in rnd
    assert cleaning["rounds_applied"] == 1


def test_backoff_keeps_the_strongest_part_of_a_round_that_breaks_the_model() -> None:
    """cleaning_backoff: a round below the agreement bar whose target is named with
    evidence is trimmed (strongest outliers first) to the part that meets the bar instead
    of being undone; on a class nothing names it is undone."""
    case = _share_case()
    assert case.found.inversion is not None
    nc = case.found.inversion.suspected_target
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16), synthetic=case.images)
    knobs = dict(LOOSE_CLEANING, prior_name_share=None)

    def cleaning(anomaly: float, **extra: object) -> dict:
        config = _config("cnc", **{**knobs, **extra})
        res = purify(case.model, config, proxies=case.named(nc, anomaly), **kw)
        return {"detection": res.detection, **res.detection["teacher_cleaning"]}

    planned = cleaning(3.0)["rounds"][0]  # no bar: the whole round
    assert planned["agreement"] < 0.7
    undone = cleaning(3.0, cleaning_min_agreement=0.7, cleaning_backoff=False)
    assert undone["rounds"][0]["undone"] == "agreement" and undone["rounds_applied"] == 0
    trimmed = cleaning(3.0, cleaning_min_agreement=0.7)  # the preset's backoff
    rnd = trimmed["rounds"][0]
    assert rnd["backoff"] == {
        "planned": planned["suppressed"],
        "agreement_planned": planned["agreement"],
    }
    assert 0 < rnd["suppressed"] < planned["suppressed"]
    assert rnd["agreement"] >= 0.7 and "undone" not in rnd
    assert trimmed["rounds_applied"] == 1
    assert trimmed["agreement_with_original"] == rnd["agreement"]
    text = render_report({"detection": trimmed["detection"]})
    assert f"(trimmed from {planned['suppressed']} channels, which left agreement" in text
    # Neural Cleanse unsure and no share rule: the class is named by nothing, not trimmed
    unnamed = cleaning(0.5, cleaning_min_agreement=0.7)
    assert unnamed["rounds"][0]["undone"] == "agreement" and "backoff" not in unnamed["rounds"][0]


def test_strongest_first_orders_a_rounds_components_by_their_outlier_strength() -> None:
    net = _tucker_net()
    clean, proxies = _planted_pair()
    res = suppress_sensitive_ranks(net, clean, proxies, SensitivityConfig(u=0.5, max_fraction=1))
    order = strongest_first(res)
    assert len(order) == res.num_suppressed > 1
    assert order[0] == ("0.first", 0, 0.0)  # the planted trigger component leads
    strengths = {
        (n, i): s
        for n in res.suppressed
        for i, s in zip(res.suppressed[n], res.strengths[n], strict=True)
    }
    ranked = [strengths[(n, i)] for n, i, _ in order]
    assert ranked == sorted(ranked, reverse=True) and min(ranked) > 0.5
    # applying the listed factors again to a fresh copy reproduces the suppression
    again = _tucker_net()
    apply_suppression(again, res.suppressed, res.factors, include_dense=False)
    assert torch.equal(again[0].first.weight, net[0].first.weight)
    assert torch.equal(again[0].core.weight, net[0].core.weight)


def test_cleaning_that_leaves_the_trigger_as_easy_to_reach_is_undone() -> None:
    """A round after which the re-inverted trigger's mask did not grow enough is undone: the
    same model as no cleaning, the trigger still trusted (best epoch kept), and the report
    says why."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    loose = LOOSE_CLEANING
    guarded = purify(model, _config("cnc", **loose, cleaning_min_mask_growth=1e9), **kw)
    cleaning = guarded.detection["teacher_cleaning"]
    rnd = cleaning["rounds"][0]
    assert rnd["suppressed"] > 0 and rnd["undone"] == "mask_growth" and rnd["mask_growth"] > 0
    assert cleaning["rounds_applied"] == 0 and cleaning["agreement_with_original"] == 1.0
    assert guarded.detection["finetune_selection"] == "best epoch"
    plain = purify(model, _config("cnc", **loose, cleaning=False), **kw)
    assert torch.allclose(guarded.model(x), plain.model(x), atol=1e-6)
    page = render_report({"detection": guarded.detection})
    assert "did not reach the trigger" in page and "x larger after" in page
    kept = purify(model, _config("cnc", **loose, cleaning_min_mask_growth=0.0), **kw)
    assert kept.detection["teacher_cleaning"]["rounds_applied"] == 1
    assert not torch.allclose(kept.model(x), plain.model(x), atol=1e-6)


def test_cleaning_after_which_the_trigger_still_fires_is_undone() -> None:
    """Every round records how often the stamped trigger reaches the target before and
    after; a round whose share after exceeds ``cleaning_max_flip`` is undone (the model is
    then the uncleaned one, the trigger still trusted) and the report says why."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    loose = dict(detect=False, cleaning_u=0.5, cleaning_max_fraction=0.5, cleaning_min_agreement=0)
    kept = purify(model, _config("cnc", **loose, cleaning_max_flip=1.0), **kw)
    rnd = kept.detection["teacher_cleaning"]["rounds"][0]
    assert 0.0 <= rnd["flip_after"] <= 1.0 and 0.0 <= rnd["flip_before"] <= 1.0
    assert "undone" not in rnd
    # a bar below any share undoes the round
    guarded = purify(model, _config("cnc", **loose, cleaning_max_flip=-1.0), **kw)
    cleaning = guarded.detection["teacher_cleaning"]
    assert cleaning["rounds"][0]["undone"] == "flip" and cleaning["rounds_applied"] == 0
    assert guarded.detection["finetune_selection"] == "best epoch"
    plain = purify(model, _config("cnc", **loose, cleaning=False), **kw)
    assert torch.allclose(guarded.model(x), plain.model(x), atol=1e-6)
    page = render_report({"detection": guarded.detection})
    assert "still reached the target" in page and "stamped trigger reaches the target" in page


def test_cleaning_that_hardly_cuts_the_trigger_reach_is_undone() -> None:
    """``cleaning_min_reach_cut``: a round must cut the stamped trigger's reach by that share
    of what it was, or it is undone (``undone: "reach_cut"``) and the uncleaned model kept."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    loose = LOOSE_CLEANING
    # a negative cut lets the reach grow (here it doubles, 0.5 -> 1.0)
    kept = purify(model, _config("cnc", **loose, cleaning_min_reach_cut=-2.0), **kw)
    assert "undone" not in kept.detection["teacher_cleaning"]["rounds"][0]
    # no round can cut the reach by more than all of it
    guarded = purify(model, _config("cnc", **loose, cleaning_min_reach_cut=1.01), **kw)
    cleaning = guarded.detection["teacher_cleaning"]
    rnd = cleaning["rounds"][0]
    assert rnd["undone"] == "reach_cut" and cleaning["rounds_applied"] == 0
    plain = purify(model, _config("cnc", **loose, cleaning=False), **kw)
    assert torch.allclose(guarded.model(x), plain.model(x), atol=1e-6)
    assert not torch.allclose(kept.model(x), plain.model(x), atol=1e-6)
    page = render_report({"detection": guarded.detection})
    assert "reach fell only from" in page


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_compresses(method: str) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = purify(model, _config(method, detect=False), input_shape=(3, 16, 16))
    params = sum(p.numel() for p in res.model.parameters())
    assert params < sum(p.numel() for p in model.parameters())
    assert res.model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert res.timings


def test_purify_cancels_within_one_step() -> None:
    model = _model()
    calls: list[tuple[str, float]] = []

    def listener(stage: str, fraction: float) -> None:
        calls.append((stage, fraction))
        if stage.startswith("finetune/"):
            raise Cancelled

    with pytest.raises(Cancelled):
        purify(model, _config("cnc"), input_shape=(3, 16, 16), progress=listener)
    assert calls[-1][0].startswith("finetune")
    assert sum(s.startswith("finetune/") for s, _ in calls) == 1
    fractions = [f for _, f in calls]
    steps = zip(fractions, fractions[1:], strict=False)
    assert all(b >= a - 1e-9 for a, b in steps)  # up to float rounding


def test_knobs_are_checked_and_applied() -> None:
    cfg = PurifyConfig.from_knobs(
        method="cnc", knobs={"epochs": 3, "pgd_eps": 0.05, "sensitivity": False, "proxy": "pgd"}
    )
    assert cfg.finetune.epochs == 3 and cfg.proxy.pgd.eps == 0.05
    assert cfg.sensitivity is None and cfg.proxy.kind in PROXY_KINDS
    with pytest.raises(ValueError, match="unknown purification setting"):
        PurifyConfig.from_knobs(method="cnc", knobs={"nope": 1})
    with pytest.raises(ValueError):
        PurifyConfig.for_method("bogus")
    assert all(isinstance(path, tuple) and path for path in KNOBS.values())


def test_proxy_driven_channel_pruning_removes_a_planted_backdoor() -> None:
    """Teacher cleaning's core: channels that light up under the inverted trigger carry the
    backdoor of a tiny net trained in-test with a patch trigger (target 0)."""
    import copy

    from cnc_core.purify.proxies import ProxyConfig, TriggerInversionConfig, make_proxies, predict
    from tests.core.test_proxies import MEAN, STD, _stats, backdoored_tiny, make_task, stamp

    net = backdoored_tiny()
    m, s = _stats()
    x, y = make_task(300, seed=99)
    keep = y != 0

    def acc_asr(model: nn.Module) -> tuple[float, float]:
        acc = (predict(model, (x - m) / s) == y).float().mean()
        asr = (predict(model, (stamp(x[keep]) - m) / s) == 0).float().mean()
        return float(acc), float(asr)

    synth, _ = make_task(128, seed=7)  # stand-in for synthetic images
    images = (synth - m) / s
    cfg = ProxyConfig(
        kind="trigger_inversion", inversion=TriggerInversionConfig(steps=60, images_per_class=16)
    )
    proxies = make_proxies(net, images, cfg, mean=MEAN, std=STD)
    cleaned = copy.deepcopy(net)
    res = suppress_sensitive_ranks(
        cleaned,
        images,
        proxies.images,
        SensitivityConfig(u=2.0, max_fraction=0.2, include_dense=True),
    )
    assert res.num_suppressed > 0
    acc, asr = acc_asr(cleaned)
    assert acc_asr(net)[1] > 0.9 and asr < 0.2 and acc > 0.5


def test_blend_proxies_are_stamped_beside_the_inverted_trigger() -> None:
    """blend_proxy adds whole-image blends to the unlearning stamps and reports what each
    pattern does to the original model; "none" (the default) leaves the pipeline unchanged."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    plain = purify(model, _config("cnc", detect=False), **kw)
    assert "blend_proxy" not in plain.detection
    both = purify(model, _config("cnc", detect=False, blend_proxy="both", blend_noise=3), **kw)
    info = both.detection["blend_proxy"]
    assert info["kind"] == "both" and info["alpha"] == 0.2
    # the mean-difference pattern (when the suspected target has images) and 3 noise patterns
    assert info["patterns"] in (3, 4)
    assert len(info["original_model_top_class"]) == info["patterns"]
    assert all(0 < s["share"] <= 1 for s in info["original_model_top_class"])
    assert not torch.allclose(both.model(x), plain.model(x), atol=1e-6)
    with pytest.raises(ValueError, match="blend_proxy"):
        purify(model, _config("cnc", detect=False, blend_proxy="stripes"), **kw)


def test_refit_knob_runs_a_timed_stage_keeps_the_size_and_is_validated() -> None:
    """The preset refits the compact factors (same parameter count, other weights) in a
    stage of its own, refit=false keeps the truncated ones; bad settings fail at the start,
    naming the knob."""
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    assert PurifyConfig.for_method("cnc").refit is not None
    assert PurifyConfig.for_method("cnc-paper").refit is None
    plain = purify(model, _config("cnc", detect=False, refit=False), **kw)
    refit = purify(model, _config("cnc", detect=False), **kw)
    assert "refit" in refit.timings and "refit" not in plain.timings
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(refit.model) == count(plain.model)
    x = torch.rand(8, 3, 16, 16)
    assert not torch.allclose(refit.model(x), plain.model(x), atol=1e-6)
    with pytest.raises(ValueError, match="refit_weighting"):
        purify(model, _config("cnc", detect=False, refit_weighting="loud"), **kw)
    scaled = PurifyConfig.from_knobs(
        method="cnc",
        compress=CompressConfig(ratio=1.5, scaling="clip", t_scale=0.5),
        knobs=dict(SMALL, refit=True),
    )
    with pytest.raises(ValueError, match="exclusive"):
        purify(model, scaled, **kw)


def test_permutation_knob_adds_the_trigger_only_past_its_bar() -> None:
    """The preset inverts an all-to-all trigger in a timed stage and reports it; the trigger
    joins the unlearning stamps only past its gate (flip rate, distinct targets)."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    assert PurifyConfig.for_method("cnc").permutation is not None
    assert PurifyConfig.for_method("cnc-paper").permutation is None
    small = dict(detect=False, permutation_restarts=2, permutation_max_anomaly=None)
    plain = purify(model, _config("cnc", detect=False, permutation=False), **kw)
    assert "permutation" not in plain.timings and "permutation_inversion" not in plain.detection
    off = purify(model, _config("cnc", permutation_min_flip=1.01, **small), **kw)
    on = purify(
        model,
        _config("cnc", permutation_min_flip=0.0, permutation_min_targets=0.0, **small),
        **kw,
    )
    rec = on.detection["permutation_inversion"]
    assert "permutation" in on.timings and rec["used"] is True
    assert off.detection["permutation_inversion"]["used"] is False
    assert 0 <= rec["flip_rate"] <= 1 and len(rec["mapping"]) == 4 and rec["mask_norm"] > 0
    # a trigger below the bar changes nothing; one above it changes the training
    assert torch.allclose(off.model(x), plain.model(x), atol=1e-6)
    assert not torch.allclose(on.model(x), plain.model(x), atol=1e-6)
    # a clear all-to-one target (anomaly index at or above the limit): no search at all
    skip = purify(model, _config("cnc", detect=False, permutation_max_anomaly=0.0), **kw)
    record = skip.detection["permutation_inversion"]
    assert record["used"] is False and "anomaly index" in record["skipped"]
    assert torch.allclose(skip.model(x), plain.model(x), atol=1e-6)
    assert "not searched" in render_report({"detection": skip.detection})


def test_permutation_any_restart_takes_a_passing_restart_over_a_better_objective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``permutation_any_restart`` (the preset) the gate looks at every restart, so a real
    permutation found by the second restart is used although a collapse onto one class had
    the better objective; without it only the first restart is gated. The search itself is
    replaced by these two fixed outcomes (the selection is what is tested here)."""
    import cnc_core.purify.pipeline as pipeline
    from cnc_core.purify.permutation import PermutationInversionResult

    def outcome(mapping: list[int], flip: float, value: float) -> PermutationInversionResult:
        mask = torch.zeros(1, 16, 16)
        mask[:, -3:, -3:] = 1.0
        return PermutationInversionResult(
            mask=mask,
            pattern=torch.full((3, 16, 16), value),
            mask_norm=9.0,
            flip_rate=flip,
            mutual_information=0.5,
            top_share=0.3,
            mapping=mapping,
        )

    collapse = outcome([1, 0, 1, 1], 0.9, 0.0)  # two classes: fails the gate
    shift = outcome([1, 2, 3, 0], 0.8, 1.0)  # a permutation: passes
    found = dataclasses.replace(collapse, candidates=[collapse, shift])
    monkeypatch.setattr(pipeline, "permutation_inversion", lambda *a, **k: found)
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    # a gate of 3 of the 4 classes: the two-class collapse below fails it
    small = dict(detect=False, permutation_max_anomaly=None, permutation_min_targets=0.6)
    only_best = _config("cnc", permutation_any_restart=False, **small)
    first = purify(model, only_best, **kw).detection["permutation_inversion"]
    assert first["used"] is False and first["restart"] == 0 and first["targets"] == 2
    assert len(first["restarts"]) == 1
    assert PurifyConfig.for_method("cnc").permutation_any_restart is True  # the preset's
    anyr = purify(model, _config("cnc", **small), **kw)
    rec = anyr.detection["permutation_inversion"]
    assert rec["used"] is True and rec["restart"] == 1 and rec["mapping"] == [1, 2, 3, 0]
    assert [r["used"] for r in rec["restarts"]] == [False, True]
    assert "Restart 2 of the 2 gated" in render_report({"detection": anyr.detection})


def test_permutation_all_passing_stamps_every_restart_that_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``permutation_all_passing``: the triggers of all restarts that pass the gate are
    stamped (the best-objective passing one first), a failing one never; the model differs
    from the one trained on the chosen restart's trigger alone."""
    import cnc_core.purify.pipeline as pipeline
    from cnc_core.purify.permutation import PermutationInversionResult

    def outcome(mapping: list[int], corner: int, value: float) -> PermutationInversionResult:
        mask = torch.zeros(1, 16, 16)
        mask[:, corner : corner + 3, corner : corner + 3] = 1.0
        return PermutationInversionResult(
            mask=mask,
            pattern=torch.full((3, 16, 16), value),
            mask_norm=9.0,
            flip_rate=0.8,
            mutual_information=0.5,
            top_share=0.3,
            mapping=mapping,
        )

    first = outcome([1, 2, 3, 0], 0, 1.0)
    collapse = outcome([1, 0, 1, 1], 5, 0.5)  # two classes: fails the gate
    second = outcome([1, 2, 3, 0], 13, 0.0)
    found = dataclasses.replace(first, candidates=[first, collapse, second])
    monkeypatch.setattr(pipeline, "permutation_inversion", lambda *a, **k: found)
    seen: list[torch.Tensor] = []
    real_restamped = pipeline._restamped

    def spy(proxies: ProxySet, *a: object, **k: object) -> ProxySet:
        assert proxies.extra_triggers is not None
        seen.append(proxies.extra_triggers[0].clone())
        return real_restamped(proxies, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "_restamped", spy)
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    # a gate of 3 of the 4 classes: the two-class collapse below fails it
    small = dict(detect=False, permutation_max_anomaly=None, permutation_min_targets=0.6)
    one = purify(model, _config("cnc", **small), **kw)
    every = purify(model, _config("cnc", permutation_all_passing=True, **small), **kw)
    assert [m.shape[0] for m in seen] == [1, 2]
    assert torch.equal(seen[1][0], first.mask) and torch.equal(seen[1][1], second.mask)
    assert every.detection["permutation_inversion"]["stamped"] == 2
    assert "stamped" not in one.detection["permutation_inversion"]
    page = render_report({"detection": every.detection})
    assert "The triggers of all 2 restarts that passed are stamped" in page
    assert not torch.allclose(every.model(x), one.model(x), atol=1e-6)


def test_all_to_all_knobs_stamp_the_permutation_trigger_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``all_to_all_batch`` / ``all_to_all_weight``: fine-tuning gets the permutation trigger
    as a stamp of its own and the inverted triggers as the other; without them, one stamp
    mixes both. The detection record and the report say how the trigger was unlearnt."""
    import cnc_core.purify.pipeline as pipeline
    from cnc_core.purify.permutation import PermutationInversionResult

    mask = torch.zeros(1, 16, 16)
    mask[:, :3, :3] = 1.0
    perm = PermutationInversionResult(
        mask=mask,
        pattern=torch.ones(3, 16, 16),
        mask_norm=9.0,
        flip_rate=0.8,
        mutual_information=0.5,
        top_share=0.3,
        mapping=[1, 2, 3, 0],
    )
    monkeypatch.setattr(pipeline, "permutation_inversion", lambda *a, **k: perm)
    stamps: list[dict[str, object]] = []
    real_finetune = pipeline.finetune

    def spy(*a: object, **k: object) -> object:
        stamps.append({"first": k.get("stamp"), "a2a": k.get("all_to_all_stamp")})
        return real_finetune(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "finetune", spy)
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    small = dict(detect=False, permutation_max_anomaly=None, dynamic=False)
    mixed = purify(model, _config("cnc", **small), **kw)
    apart = purify(
        model, _config("cnc", all_to_all_batch="joint", all_to_all_weight=4.0, **small), **kw
    )
    assert stamps[0]["a2a"] is None and "all_to_all_stamp" not in mixed.detection
    assert apart.detection["all_to_all_stamp"] == {"batch": "joint", "weight": 4.0}
    assert "in the joint batch mode, at weight 4" in render_report({"detection": apart.detection})
    # the permutation trigger (the top-left corner at the pattern's 1.0) is the second
    # stamp's alone; the first stamps the inverted trigger, which does not set that corner
    first, a2a = stamps[1]["first"], stamps[1]["a2a"]
    assert callable(first) and callable(a2a)
    blank = torch.full((4, 3, 16, 16), -2.0)  # normalised 0.0
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(a2a(blank, gen)[:, :, :3, :3], torch.full((4, 3, 3, 3), 2.0))
    assert not torch.allclose(first(blank, gen)[:, :, :3, :3], torch.full((4, 3, 3, 3), 2.0))


@pytest.mark.parametrize("shape", ["blend", "patch", "spread"])
def test_shape_knobs_unlearn_a_blend_or_patch_trigger_apart(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """``permutation_blend_*`` split the permutation trigger off in fine-tuning where it came
    from a blend restart, ``permutation_patch_*`` where its learned mask is a compact patch;
    a mask spread over the image is stamped with the inverted triggers as without them."""
    import cnc_core.purify.pipeline as pipeline
    from cnc_core.purify.permutation import PermutationInversionResult, mask_peak_share

    mask = torch.full((1, 16, 16), 0.2) if shape == "blend" else torch.zeros(1, 16, 16)
    if shape == "patch":
        mask[:, :3, :3] = 1.0  # 4 of its 9 pixels fit the densest 2 x 2 window
    elif shape == "spread":
        mask[:, 0, :] = 1.0  # a line across the image: 2 of its 16 pixels
    perm = PermutationInversionResult(
        mask=mask,
        pattern=torch.ones(3, 16, 16),
        mask_norm=float(mask.sum()),
        flip_rate=0.8,
        mutual_information=0.5,
        top_share=0.3,
        mapping=[1, 2, 3, 0],
        blend=shape == "blend",
        peak_share=mask_peak_share(mask),
    )
    assert perm.peak_share == pytest.approx(
        {"blend": 4 / 256, "patch": 4 / 9, "spread": 2 / 16}[shape]
    )
    monkeypatch.setattr(pipeline, "permutation_inversion", lambda *a, **k: perm)
    apart: list[bool] = []
    real_finetune = pipeline.finetune

    def spy(*a: object, **k: object) -> object:
        apart.append(k.get("all_to_all_stamp") is not None)
        return real_finetune(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "finetune", spy)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    preset = PurifyConfig.for_method("cnc")
    assert (preset.permutation_blend_batch, preset.permutation_blend_weight) == ("joint", 16.0)
    assert (preset.permutation_patch_batch, preset.permutation_patch_weight) == (None, 16.0)
    knobs = dict(
        permutation_blend_batch="joint",
        permutation_blend_weight=4.0,
        permutation_patch_batch="both",
        permutation_patch_weight=2.0,
    )
    small = dict(detect=False, permutation_max_anomaly=None, dynamic=False)
    out = purify(_model(), _config("cnc", **knobs, **small), **kw)
    record = out.detection["permutation_inversion"]
    assert record["used"] is True and record["peak_share"] == perm.peak_share
    assert apart == [shape != "spread"]
    page = render_report({"detection": out.detection})
    if shape == "spread":
        assert "all_to_all_stamp" not in out.detection and "unlearnt apart" not in page
    else:
        batch, weight = ("joint", 4.0) if shape == "blend" else ("both", 2.0)
        stamp = {"batch": batch, "weight": weight, "shape": shape}
        assert out.detection["all_to_all_stamp"] == stamp
        words = "a whole-image blend" if shape == "blend" else "a patch"
        assert f"trigger ({words}) was unlearnt apart" in page
    # a report stored by session 16's code marked a blend as "blend": true
    old = {"all_to_all_stamp": {"batch": "joint", "weight": 16.0, "blend": True}}
    assert "(a whole-image blend) was unlearnt apart" in render_report({"detection": old})
    for name in ("permutation_blend_batch", "permutation_patch_batch"):
        with pytest.raises(ValueError, match=name):
            purify(_model(), _config("cnc", **{name: "mixed"}, **small), **kw)


def test_dynamic_knob_searches_where_no_pattern_permutation_is_used() -> None:
    """The dynamic trigger search runs in its own timed stage where no all-to-one target was
    named and no one-pattern permutation trigger is used; past the gate it changes the
    training, below it nothing, and the report says which."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    assert PurifyConfig.for_method("cnc").dynamic is not None
    assert PurifyConfig.for_method("cnc-paper").dynamic is None
    small = dict(detect=False, permutation=False, permutation_max_anomaly=None)
    plain = purify(model, _config("cnc", dynamic=False, **small), **kw)
    assert "dynamic" not in plain.timings and "dynamic_inversion" not in plain.detection
    off = purify(model, _config("cnc", dynamic=True, dynamic_min_flip=1.01, **small), **kw)
    gate = dict(dynamic_min_flip=0.0, dynamic_min_targets=0.0)
    on = purify(model, _config("cnc", dynamic=True, **gate, **small), **kw)
    rec = on.detection["dynamic_inversion"]
    assert "dynamic" in on.timings and rec["used"] is True
    assert off.detection["dynamic_inversion"]["used"] is False
    assert 0 <= rec["flip_rate"] <= 1 and len(rec["mapping"]) == 4 and rec["mask_norm"] > 0
    assert torch.allclose(off.model(x), plain.model(x), atol=1e-6)
    assert not torch.allclose(on.model(x), plain.model(x), atol=1e-6)
    assert "stamped beside the inverted trigger" in render_report({"detection": on.detection})
    assert "not used" in render_report({"detection": off.detection})
    # the one-pattern trigger used: no dynamic search
    both = dict(small, permutation=True, permutation_restarts=2, dynamic=True)
    gate.update(permutation_min_flip=0.0, permutation_min_targets=0.0)
    used = purify(model, _config("cnc", **gate, **both), **kw)
    assert used.detection["permutation_inversion"]["used"] is True
    assert "found and is used" in used.detection["dynamic_inversion"]["skipped"]
    # a blend restart used: the dynamic search still runs, and past its gate replaces it
    blend = dict(small, permutation=True, permutation_restarts=0, dynamic=True)
    blend.update(permutation_blend_restarts=1)
    replaced = purify(model, _config("cnc", **gate, **blend), **kw)
    perm = replaced.detection["permutation_inversion"]
    assert perm["blend"] is True and perm["used"] is False and perm["replaced_by"] == "dynamic"
    assert replaced.detection["dynamic_inversion"]["used"] is True
    assert "all_to_all_stamp" not in replaced.detection  # the blend is not unlearnt apart
    assert "replaced by the dynamic trigger" in render_report({"detection": replaced.detection})
    kept = purify(model, _config("cnc", **dict(gate, dynamic_min_flip=1.01), **blend), **kw)
    assert kept.detection["permutation_inversion"]["used"] is True
    assert kept.detection["dynamic_inversion"]["used"] is False
    # a clear all-to-one target: neither search
    skip = purify(model, _config("cnc", **dict(both, permutation_max_anomaly=0.0)), **kw)
    assert "anomaly index" in skip.detection["dynamic_inversion"]["skipped"]
    assert "not searched" in render_report({"detection": skip.detection})


def test_warp_knob_stamps_the_warp_only_past_its_bar() -> None:
    """The warp search runs in its own timed stage where no all-to-one target was named;
    past ``warp_min_reach`` its warp joins the stamped triggers (the training changes),
    below it nothing changes, and the report says which."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    small = dict(
        detect=False,
        permutation=False,
        dynamic=False,
        permutation_max_anomaly=None,
        warp_use="finetune",
    )
    plain = purify(model, _config("cnc", warp=False, **small), **kw)
    assert "warp" not in plain.timings and "warp_inversion" not in plain.detection
    off = purify(model, _config("cnc", warp_steps=3, warp_min_reach=1.01, **small), **kw)
    on = purify(model, _config("cnc", warp_steps=3, warp_min_reach=0.0, **small), **kw)
    rec = on.detection["warp_inversion"]
    assert "warp" in on.timings and rec["used"] is True
    assert off.detection["warp_inversion"]["used"] is False
    assert len(rec["success"]) == 4 and rec["reach"] == max(rec["success"])
    assert torch.allclose(off.model(x), plain.model(x), atol=1e-6)
    assert not torch.allclose(on.model(x), plain.model(x), atol=1e-6)
    assert "Warp trigger" in render_report({"detection": on.detection})
    assert "stamped beside the inverted trigger" in render_report({"detection": on.detection})
    assert "reached too few images" in render_report({"detection": off.detection})
    assert "all_to_all_stamp" not in on.detection  # beside the inverted triggers
    apart = purify(
        model,
        _config(
            "cnc", warp_steps=3, warp_min_reach=0.0, warp_batch="joint", warp_weight=4, **small
        ),
        **kw,
    )
    assert apart.detection["all_to_all_stamp"] == {"batch": "joint", "weight": 4, "shape": "warp"}
    assert "The warp trigger was unlearnt apart" in render_report({"detection": apart.detection})
    assert not torch.allclose(apart.model(x), on.model(x), atol=1e-6)
    # a clear all-to-one target: no search
    named = dict(small, permutation_max_anomaly=0.0)
    skip = purify(model, _config("cnc", warp_steps=3, **named), **kw)
    assert "anomaly index" in skip.detection["warp_inversion"]["skipped"]


def test_warp_can_drive_the_cleaning() -> None:
    """With ``warp_use=cleaning`` and a warp past its gate, the cleaning scores the channels
    on warped images with the warp's class as target, does not re-invert, and the warp is
    not stamped in fine-tuning; with ``both`` it is stamped too; an unknown use is refused."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    knobs = dict(
        detect=False,
        permutation=False,
        dynamic=False,
        permutation_max_anomaly=None,
        warp_steps=3,
        warp_min_reach=0.0,
        cleaning_min_agreement=0.0,
        cleaning_max_flip=None,
        warp_cleaning_other_class=False,
    )
    finetune = purify(model, _config("cnc", warp_use="finetune", **knobs), **kw)
    cleaning = purify(model, _config("cnc", warp_use="cleaning", **knobs), **kw)
    both = purify(model, _config("cnc", warp_use="both", **knobs), **kw)
    assert finetune.detection["teacher_cleaning"]["trigger"] == "inverted"
    rec = cleaning.detection["teacher_cleaning"]
    warp = cleaning.detection["warp_inversion"]
    assert rec["trigger"] == "warp" and rec["target"] == warp["suspected_target"]
    assert warp["use"] == "cleaning"
    assert "target_mask_norm" not in rec["rounds"][0]  # no per-class re-inversion
    assert (
        rec["rounds"][0]["flip_before"]
        != (finetune.detection["teacher_cleaning"]["rounds"][0]["flip_before"])
    )
    assert both.detection["teacher_cleaning"]["trigger"] == "warp"
    assert not torch.allclose(both.model(x), cleaning.model(x), atol=1e-6)
    text = render_report({"detection": cleaning.detection})
    assert "pruned by the warp trigger" in text and "drove the teacher cleaning" in text
    with pytest.raises(ValueError, match="warp_use"):
        purify(model, _config("cnc", warp_use="everywhere", **knobs), **kw)
    # the warp names another class than Neural Cleanse: the criterion, half of which is the
    # inverted trigger's fix rate, is not trusted and the last epoch is kept
    named = cleaning.detection["trigger_inversion"]["suspected_target"]
    assert (rec["target"] != named) == ("untrusted" in cleaning.detection["finetune_selection"])
    # the warp's cleaning has its own outlier bar
    loose = purify(model, _config("cnc", warp_use="cleaning", warp_cleaning_u=0.5, **knobs), **kw)
    strict = purify(model, _config("cnc", warp_use="cleaning", warp_cleaning_u=50, **knobs), **kw)
    assert strict.detection["teacher_cleaning"]["rounds"][0]["suppressed"] == 0
    assert loose.detection["teacher_cleaning"]["rounds"][0]["suppressed"] > 0


def _warp_proxies(named: int | None, **extra: object) -> tuple[ProxySet, PurifyConfig]:
    """The tiny model's proxies after the warp search (gate open), with Neural Cleanse's
    class set to ``named`` (None: as found)."""
    from cnc_core.purify.pipeline import _add_warp_trigger
    from cnc_core.purify.proxies import make_proxies

    model = _model()
    config = _config("cnc", warp_steps=3, warp_min_reach=0.0, **extra)
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    proxies = make_proxies(model, images, config.proxy, num_classes=4, mean=0.5, std=0.25)
    if named is not None:
        assert proxies.inversion is not None
        inversion = dataclasses.replace(proxies.inversion, suspected_target=named)
        proxies = dataclasses.replace(proxies, inversion=inversion)
    found = _add_warp_trigger(model, images, proxies, config, 0.5, 0.25, lambda *_: None)
    return found, config


def test_warp_drives_the_cleaning_only_where_it_names_another_class() -> None:
    """``warp_cleaning_other_class`` (the preset): a warp past its gate that names Neural
    Cleanse's class leaves the cleaning to the inverted trigger and, under
    ``warp_use=cleaning``, is not used; one that names another class drives it."""
    first, _ = _warp_proxies(None)
    assert first.warp_record is not None
    warp_class = int(first.warp_record["suspected_target"])
    same, config = _warp_proxies(warp_class)
    assert config.warp_cleaning_other_class and config.warp_use == "cleaning"
    assert same.warp_record is not None and same.warp_record["used"] is False
    assert same.cleaning_warp is None and "as Neural Cleanse does" in same.warp_record["cleaning"]
    text = render_report({"detection": {"warp_inversion": same.warp_record}})
    assert "not used; the cleaning was not driven" in text
    other, _ = _warp_proxies((warp_class + 1) % 4)
    assert other.warp_record is not None and other.warp_record["used"] is True
    assert other.cleaning_warp is not None and "cleaning" not in other.warp_record
    anyway, _ = _warp_proxies(warp_class, warp_cleaning_other_class=False)
    assert anyway.cleaning_warp is not None
    both, _ = _warp_proxies(warp_class, warp_use="both")  # still stamped in fine-tuning
    assert both.warp_record is not None and both.warp_record["used"] is True
    assert both.cleaning_warp is None and both.warp_field is not None
    text = render_report({"detection": {"warp_inversion": both.warp_record}})
    assert "stamped beside the inverted trigger in unlearning; the cleaning was not" in text


def test_misnamed_inverted_trigger_left_out_of_the_stamps() -> None:
    """``misnamed_inverted``: where the warp names another class than Neural Cleanse and
    drives the cleaning, "drop" and "warp" leave Neural Cleanse's trigger out of every stamp
    ("warp" stamps the warp in its place; "drop" with nothing else found leaves fine-tuning
    nothing to unlearn); "keep" stamps it; where both name one class nothing changes; an
    unknown choice is refused."""
    from cnc_core.purify.pipeline import _nothing_to_unlearn, _stamp_of, _stamped_triggers
    from cnc_core.purify.warp import warp_stamp

    first, _ = _warp_proxies(None)
    assert first.warp_record is not None
    warp_class = int(first.warp_record["suspected_target"])
    other = (warp_class + 1) % 4
    kept, config = _warp_proxies(other)
    assert not kept.inverted_dropped and kept.warp_field is None
    assert _stamped_triggers(config, kept)[0].shape[0] == 1  # Neural Cleanse's trigger
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    warped, cfg = _warp_proxies(other, misnamed_inverted="warp")
    assert warped.inverted_dropped and warped.cleaning_warp is not None
    assert _stamped_triggers(cfg, warped)[0].shape[0] == 0 and warped.warp_field is not None
    assert warped.warp_record is not None and "warp unlearnt" in warped.warp_record["inverted"]
    stamp = _stamp_of(cfg, warped, 0.5, 0.25)
    assert stamp is not None
    only_warp = warp_stamp(warped.warp_field, mean=0.5, std=0.25)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.allclose(stamp(images, g1), only_warp(images, g2))
    dropped, cfg = _warp_proxies(other, misnamed_inverted="drop")
    assert dropped.inverted_dropped and dropped.warp_field is None
    assert _nothing_to_unlearn(dropped) and not _nothing_to_unlearn(warped)
    assert dropped.warp_record is not None
    assert "nothing is left to unlearn" in dropped.warp_record["inverted"]
    text = render_report({"detection": {"warp_inversion": dropped.warp_record}})
    assert "it drove the teacher cleaning; Neural Cleanse's trigger (class" in text
    same, cfg = _warp_proxies(warp_class, misnamed_inverted="drop")
    assert not same.inverted_dropped and _stamped_triggers(cfg, same)[0].shape[0] == 1
    with pytest.raises(ValueError, match="misnamed_inverted"):
        purify(_model(), _config("cnc", misnamed_inverted="sometimes"), input_shape=(3, 16, 16))


def test_dropped_misnamed_trigger_leaves_fine_tuning_bare() -> None:
    """A whole run with ``misnamed_inverted=drop`` where the warp names another class than
    Neural Cleanse and nothing else is found: the rank sensitivity is skipped and the
    student differs from the one that unlearns Neural Cleanse's trigger ("keep")."""
    from cnc_core.purify.proxies import make_proxies

    model = _model()
    x = torch.rand(8, 3, 16, 16)
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    first, _ = _warp_proxies(None)
    assert first.warp_record is not None
    other = (int(first.warp_record["suspected_target"]) + 1) % 4
    knobs = dict(
        warp_steps=3,
        warp_min_reach=0.0,
        permutation=False,
        dynamic=False,
        permutation_max_anomaly=None,
        cleaning_min_agreement=0.0,
        cleaning_max_flip=None,
        target_images=0,
    )
    runs = {}
    for choice in ("keep", "drop"):
        config = _config("cnc", misnamed_inverted=choice, **knobs)
        proxies = make_proxies(model, images, config.proxy, num_classes=4, mean=0.5, std=0.25)
        assert proxies.inversion is not None
        inversion = dataclasses.replace(proxies.inversion, suspected_target=other)
        proxies = dataclasses.replace(proxies, inversion=inversion)
        runs[choice] = purify(
            model,
            config,
            mean=0.5,
            std=0.25,
            input_shape=(3, 16, 16),
            synthetic=images,
            proxies=proxies,
        )
    keep, drop = runs["keep"], runs["drop"]
    assert drop.detection["teacher_cleaning"]["trigger"] == "warp"
    assert "nothing is left to unlearn" in drop.detection["warp_inversion"]["inverted"]
    assert "sensitivity_skipped" in drop.detection and "sensitivity" not in drop.timings
    assert "sensitivity_skipped" not in keep.detection
    assert not torch.allclose(keep.model(x), drop.model(x), atol=1e-6)


def test_named_targets_spared_by_the_prior_correction() -> None:
    """``prior_spare_named``: Neural Cleanse's class at or above the anomaly bar, and a warp
    in use, are the named targets; the preset spares them in the correction."""
    from cnc_core.purify.pipeline import named_targets

    first, _ = _warp_proxies(None)
    assert first.warp_record is not None
    warp = int(first.warp_record["suspected_target"])
    nc = (warp + 1) % 4
    found, _ = _warp_proxies(nc)
    assert found.inversion is not None and found.warp_record is not None
    anomaly = found.inversion.anomaly_index
    assert named_targets(None, found) == []
    assert named_targets(anomaly, found) == sorted({nc, warp})
    assert named_targets(anomaly + 0.01, found) == [warp]
    gated = dataclasses.replace(
        found, warp_record={**found.warp_record, "used": False, "passed": False}
    )
    assert named_targets(anomaly + 0.01, gated) == []
    assert named_targets(anomaly, gated) == [nc]
    # a warp that agrees with Neural Cleanse is not used for the cleaning, but still named
    agrees, _ = _warp_proxies(warp)
    assert agrees.warp_record is not None and agrees.warp_record["used"] is False
    assert named_targets(1e9, agrees) == [warp]
    assert PurifyConfig.for_method("cnc").prior_spare_named == 2.0


def test_warp_search_skipped_beside_a_dynamic_trigger() -> None:
    """Where the dynamic all-to-all trigger passed its gate the warp search does not run
    (its record says why) unless ``warp_beside_all_to_all``; beside a permutation trigger
    (whose gate passed on WaNet all-to-one) it still runs."""
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    knobs = dict(detect=False, permutation_max_anomaly=None, warp_steps=3)
    dynamic = dict(knobs, permutation_min_flip=1.01, dynamic_min_flip=0.0, dynamic_min_targets=0.0)
    skipped = purify(model, _config("cnc", **dynamic), **kw)
    assert skipped.detection["dynamic_inversion"]["used"] is True
    assert "dynamic all-to-all trigger" in skipped.detection["warp_inversion"]["skipped"]
    assert "warp" in skipped.timings  # the stage is still timed (it took no time)
    text = render_report({"detection": skipped.detection})
    assert "(the warping-trigger proxy): not searched; the dynamic all-to-all" in text
    beside = purify(model, _config("cnc", warp_beside_all_to_all=True, **dynamic), **kw)
    assert "reach" in beside.detection["warp_inversion"]
    permutation = dict(knobs, dynamic=False, permutation_min_flip=0.0, permutation_min_targets=0.0)
    found = purify(model, _config("cnc", **permutation), **kw)
    assert found.detection["permutation_inversion"]["used"] is True
    assert "reach" in found.detection["warp_inversion"]


def test_cleaning_can_use_the_all_to_all_trigger() -> None:
    """With ``cleaning_all_to_all`` and a permutation trigger past its gate, cleaning scores
    the channels on images stamped with that trigger alone, counts its reach by the trigger's
    mapping, draws no target-class images, and says so in the record and the report."""
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    knobs = dict(
        detect=False,
        permutation_restarts=2,
        permutation_max_anomaly=None,
        permutation_min_flip=0.0,
        permutation_min_targets=0.0,
        dynamic=False,
        cleaning_min_agreement=0.0,
        cleaning_max_flip=None,
        target_images=8,
    )
    plain = purify(model, _config("cnc", **knobs), **kw)
    a2a = purify(model, _config("cnc", cleaning_all_to_all=True, **knobs), **kw)
    assert plain.detection["permutation_inversion"]["used"] is True
    assert plain.detection["teacher_cleaning"]["trigger"] == "inverted"
    cleaning = a2a.detection["teacher_cleaning"]
    assert cleaning["trigger"] == "all-to-all"
    assert (
        cleaning["rounds"][0]["flip_before"]
        != plain.detection["teacher_cleaning"]["rounds"][0]["flip_before"]
    )
    assert "target_mask_norm" not in cleaning["rounds"][0]  # no per-class re-inversion
    assert "no one target" in a2a.detection["target_synthesis"]["skipped"]
    assert "pruned by the all-to-all trigger" in render_report({"detection": a2a.detection})


def test_all_to_all_trigger_can_replace_the_inverted_ones() -> None:
    """With ``inverted_beside_all_to_all=false`` and an all-to-all trigger past its gate,
    the teacher is not cleaned and the training changes; below the gate nothing changes."""
    model = _model()
    x = torch.rand(8, 3, 16, 16)
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    knobs = dict(detect=False, permutation_restarts=2, permutation_max_anomaly=None, dynamic=False)
    gate = dict(permutation_min_flip=0.0, permutation_min_targets=0.0)
    beside = purify(model, _config("cnc", **knobs, **gate), **kw)
    alone = purify(model, _config("cnc", inverted_beside_all_to_all=False, **knobs, **gate), **kw)
    assert "rounds" in beside.detection["teacher_cleaning"]
    assert "left out" in alone.detection["teacher_cleaning"]["skipped"]
    assert "cleaning" not in alone.timings
    assert not torch.allclose(alone.model(x), beside.model(x), atol=1e-6)
    assert "Teacher cleaning: skipped" in render_report({"detection": alone.detection})
    closed = dict(knobs, permutation_min_flip=1.01)
    same = purify(model, _config("cnc", **closed), **kw)
    same_alone = purify(model, _config("cnc", inverted_beside_all_to_all=False, **closed), **kw)
    assert torch.allclose(same.model(x), same_alone.model(x), atol=1e-6)


def test_report_says_what_the_permutation_trigger_did() -> None:
    """The human-readable report names the permutation trigger's effect and whether it was
    used, from the detection record purify writes."""
    record = {
        "mask_norm": 30.5,
        "flip_rate": 0.459,
        "mutual_information": 1.07,
        "top_share": 0.26,
        "mapping": [1, 2, -1],
        "targets": 2,
        "used": True,
    }
    page = render_report({"detection": {"permutation_inversion": record}})
    assert "mask L1 30.5" in page and "45.9%" in page and "26.0%" in page
    assert "0->1, 1->2 (onto 2 classes)." in page and "stamped beside the inverted trigger" in page
    unused = render_report({"detection": {"permutation_inversion": {**record, "used": False}}})
    assert "not used" in unused


def test_cnc_allocates_ranks_on_response_spectra_and_reports_it() -> None:
    """The cnc preset allocates by a threshold on response spectra, small layers dense;
    other methods keep the plain compression defaults; the allocator really reads the
    responses (other ranks than on the weights), and a bad value is refused by name."""
    cnc, paper = PurifyConfig.for_method("cnc"), PurifyConfig.for_method("cnc-paper")
    assert (cnc.compress.allocation, cnc.compress.min_layer_share) == ("threshold", 0.1)
    assert cnc.allocation_spectra == "response"
    assert (paper.compress.allocation, paper.compress.min_layer_share) == ("keep_ratio", 0.0)
    assert paper.allocation_spectra == "weight"
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, in_chans=3, width=4).eval()
    with torch.no_grad():
        model.train()
        model(torch.rand(32, 3, 16, 16))  # non-trivial BN statistics
        model.eval()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    cc = CompressConfig(ratio=2.0, allocation="threshold")

    def ranks(spectra: str) -> tuple[dict[str, tuple[str, tuple[int, int]]], str]:
        config = PurifyConfig.from_knobs(
            method="cnc",
            compress=cc,
            knobs=dict(SMALL, detect=False, epochs=0, allocation_spectra=spectra),
        )
        res = purify(model, config, **kw)
        assert res.compress is not None
        kept = {d.name: (d.kind, d.ranks) for d in res.compress.decisions}
        return kept, res.compress.summary()["spectra"]

    by_weight, label_w = ranks("weight")
    by_response, label_r = ranks("response")
    assert (label_w, label_r) == ("weight", "response")
    assert by_weight.keys() == by_response.keys() and by_weight != by_response
    with pytest.raises(ValueError, match="allocation_spectra"):
        ranks("gradient")


def test_purify_holds_a_mac_budget_and_the_report_says_so() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, in_chans=3, width=4).eval()
    cc = CompressConfig(ratio=1.5, allocation="threshold", mac_ratio=1.5)
    config = PurifyConfig.from_knobs(
        method="cnc", compress=cc, knobs=dict(SMALL, detect=False, epochs=0)
    )
    res = purify(model, config, mean=0.5, std=0.25, input_shape=(3, 16, 16))
    assert res.compress is not None
    summary = res.compress.summary()
    assert summary["macs_after"] <= summary["target_macs"] < summary["macs_before"]
    page = render_report(
        {"compression": summary, "layers": [d.to_dict() for d in res.compress.decisions]}
    )
    assert "MACs held to 1/1.5 of the original's" in page


def test_drop_disputed_leaves_out_the_images_cleaning_moved_off_the_target() -> None:
    """The disputed images are those the original assigns to the target and the cleaned
    teacher does not; with ``drop_disputed`` their count is reported (only where cleaning
    ran) and they are left out of fine-tuning."""

    class Fixed(nn.Module):
        def __init__(self, labels: torch.Tensor) -> None:
            super().__init__()
            self.labels = labels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            idx = x[:, 0, 0, 0].long()
            return nn.functional.one_hot(self.labels[idx], 4).float()

    images = torch.arange(6.0).view(6, 1, 1, 1)
    original = Fixed(torch.tensor([0, 0, 0, 1, 2, 0]))
    cleaned = Fixed(torch.tensor([0, 3, 1, 1, 0, 2]))
    mask = disputed_images(original, cleaned, images, target=0)
    assert mask.tolist() == [False, True, True, False, False, True]

    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    loose = dict(detect=False, cleaning_u=0.5, cleaning_max_fraction=0.5)
    cleaned_run = purify(model, _config("cnc", **loose, drop_disputed=True), **kw)
    assert isinstance(cleaned_run.detection["disputed_dropped"], int)
    plain = purify(model, _config("cnc", **loose, cleaning=False, drop_disputed=True), **kw)
    assert "disputed_dropped" not in plain.detection


def test_target_synthesis_adds_images_of_the_target_drawn_from_the_cleaned_model() -> None:
    """With ``target_images`` the cleaned teacher draws extra images of the suspected target
    for fine-tuning (stage timed, record in the detection); with no cleaning round held, or
    one after which the stamped trigger still reaches the target too often, nothing is
    drawn."""
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    loose = dict(detect=False, cleaning_u=0.5, cleaning_max_fraction=0.5)
    held = dict(loose, cleaning_min_agreement=0.0, cleaning_max_flip=None)
    draw = dict(target_images=8, target_class_weight=50.0, target_max_flip=1.0)
    run = purify(model, _config("cnc", **held, **draw), **kw)
    record = run.detection["target_synthesis"]
    assert record["images"] == 8 and record["target"] == run.suspected_target
    assert 0.0 <= record["original_says_target"] <= 1.0
    assert record["cleaned_says_target"] > 0.5  # pulled to the target by the cleaned model
    assert "target_synthesis" in run.timings
    undone = purify(
        model,
        _config("cnc", **loose, target_images=8, cleaning_min_agreement=1.01),
        **kw,
    )
    assert undone.detection["target_synthesis"] == {
        "images": 0,
        "skipped": "no cleaning round held",
    }
    assert "Target-class images: 8 images of class" in render_report({"detection": run.detection})
    still = purify(model, _config("cnc", **held, **dict(draw, target_max_flip=-1.0)), **kw)
    assert still.detection["target_synthesis"]["images"] == 0
    assert "still reaches the target" in still.detection["target_synthesis"]["skipped"]
    page = render_report({"detection": still.detection})
    assert "Target-class images: none drawn; the stamped trigger still reaches" in page
    plain = purify(model, _config("cnc", **loose, target_images=0), **kw)
    assert "target_synthesis" not in plain.detection


def test_refreshed_stamp_keeps_the_blend_stamp_beside_the_triggers() -> None:
    """refresh_every re-inverts the trigger on the student; the blend proxy stamped beside
    it before the refresh is still stamped after it."""
    from cnc_core.purify.pipeline import _stamp_refresher
    from cnc_core.purify.proxies import make_proxies

    model = _model()
    config = _config("cnc", detect=False)
    images = torch.rand(16, 3, 16, 16)
    proxies = make_proxies(model, images, config.proxy, num_classes=4)

    def marker(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
        return torch.full_like(x, 42.0)

    refresh = _stamp_refresher(config, images, proxies, 0.0, 1.0, 4, blend=marker)
    stamp = refresh(model, 2)
    out = stamp(images.repeat(4, 1, 1, 1), torch.Generator().manual_seed(0))
    marked = (out == 42.0).flatten(1).all(1)
    assert 0 < int(marked.sum()) < out.shape[0]  # both the blend and the triggers are drawn
    plain = _stamp_refresher(config, images, proxies, 0.0, 1.0, 4)(model, 2)
    assert not (plain(images, torch.Generator().manual_seed(0)) == 42.0).any()


def test_prior_correction_knob() -> None:
    """``prior_correction`` runs in its own timed stage after fine-tuning, moves only the
    classifier's bias, and says what it did; an unknown reference is refused."""
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    plain = purify(model, _config("cnc", prior_correction=0), **kw)
    fixed = purify(model, _config("cnc", prior_correction=3, prior_avoided_below=None), **kw)
    rec = fixed.detection["prior_correction"]
    assert "prior" in fixed.timings and "prior" not in plain.timings
    assert rec["reference"] == "cleaned" and len(rec["shift"]) == 4 and any(rec["shift"])
    changed = [
        k
        for k, v in fixed.model.state_dict().items()
        if not torch.equal(v, plain.model.state_dict()[k])
    ]
    assert changed == ["fc.bias"]
    assert "prior_correction" not in plain.detection
    text = render_report({"detection": fixed.detection})
    assert "Class-prior correction: the classifier's biases were shifted" in text
    with pytest.raises(ValueError, match="prior_reference"):
        purify(model, _config("cnc", prior_reference="uniform"), **kw)
    # the rows refit instead: weights and bias of the classifier move, the record says so
    knobs = dict(prior_correction=3, prior_avoided_below=None, prior_head_ridge=0.1)
    refit = purify(model, _config("cnc", **knobs), **kw)
    rec = refit.detection["prior_correction"]
    assert rec["head_ridge"] == 0.1 and rec["refit"] and len(rec["refit"]) == len(rec["corrected"])
    assert refit.prior_reference_logits is not None
    assert refit.prior_reference_logits.shape[1] == 4 and plain.prior_reference_logits is None
    moved = {
        k
        for k, v in refit.model.state_dict().items()
        if not torch.equal(v, plain.model.state_dict()[k])
    }
    assert moved == {"fc.weight", "fc.bias"}
    assert "rows of the classes the student avoided were refit" in render_report(
        {"detection": refit.detection}
    )
    # the preset (where a target is named: no refit to the original) shifts only the
    # classes the student avoids, and records which
    shifted = dict(prior_unnamed_ridge=None)
    preset = purify(model, _config("cnc", **shifted), **kw).detection["prior_correction"]
    before, teacher = preset["student_before"], preset["teacher"]
    assert preset["avoided_below"] == 0.6 and preset["spare_named"] == 2.0
    assert preset["max_shift"] == 1.5 and max(abs(v) for v in preset["shift"]) <= 1.5
    assert not set(preset["spared"]) & set(preset["corrected"])
    assert preset["corrected"] == [c for c in range(4) if before[c] < 0.6 * teacher[c]]
    assert all(preset["shift"][c] == 0.0 for c in range(4) if c not in preset["corrected"])
    # a named target keeps its bias (every class Neural Cleanse names passes a bar of -1e9)
    knobs = dict(prior_correction=3, prior_avoided_below=None, prior_spare_named=-1e9)
    spared = purify(model, _config("cnc", **knobs), **kw).detection
    named, rec = spared["trigger_inversion"]["suspected_target"], spared["prior_correction"]
    assert named in rec["spared"] and rec["shift"][named] == 0.0 and named not in rec["corrected"]
    text = render_report({"detection": spared})
    assert f"Left out as a named target: class {named}" in text
    # the only avoided class spared: the others' least share is what the report quotes
    lone = dict(
        preset,
        corrected=[],
        spared=[1],
        shift=[0.0] * 4,
        teacher=[0.25] * 4,
        student_before=[0.3, 0.05, 0.2, 0.45],
        avoided_below=0.6,
    )
    text = render_report({"detection": {"prior_correction": lone}})
    assert "no other class needed it; the student gave every other class at least 80" in text
    assert "Left out as a named target: class 1." in text
    none = dict(preset, corrected=[], spared=[], shift=[0.0] * 4)
    text = render_report({"detection": {"prior_correction": none}})
    assert "Class-prior correction: no class needed it" in text and "+0.00" not in text


def test_shared_targets_names_the_classes_the_original_favours() -> None:
    """``prior_name_share``: a class given more than that multiple of the uniform share."""
    from cnc_core.purify.pipeline import shared_targets

    share = torch.tensor([0.30, 0.20, 0.26, 0.24])
    assert shared_targets(share, 1.1) == [0]  # the bar: 0.275
    assert shared_targets(share, 1.0) == [0, 2]
    assert shared_targets(share, 1.3) == []
    assert shared_targets(None, 1.1) == [] and shared_targets(share, None) == []
    assert PurifyConfig.for_method("cnc").prior_name_share == 1.5
    assert PurifyConfig.for_method("cnc").share_steers_inversion is True
    assert PurifyConfig.for_method("cnc").cleaning_backoff is True
    assert PurifyConfig.for_method("cnc").all_to_one_needs_share is False


def test_prior_unnamed_ridge_refits_to_the_original_only_where_nothing_is_named() -> None:
    """``prior_unnamed_ridge``: where no class is named, the rows are refit to the original
    model's logits (the same model as ``prior_head_ridge`` with ``prior_reference=original``);
    where Neural Cleanse or the original's share names a class, the run is the bias shift it
    would be without the knob."""
    model = _model()
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    base = dict(
        prior_correction=3, prior_avoided_below=None, prior_spare_named=1e9, prior_name_share=None
    )
    unnamed = purify(model, _config("cnc", **base, prior_unnamed_ridge=0.1), **kw)
    rec = unnamed.detection["prior_correction"]
    assert rec["unnamed_refit"] and rec["reference"] == "original" and rec["spared"] == []
    assert rec["head_ridge"] == 0.1 and rec["refit"] and rec["named_by_share"] == []
    explicit = purify(
        model,
        _config(
            "cnc",
            **base,
            prior_head_ridge=0.1,
            prior_reference="original",
            prior_unnamed_ridge=None,
        ),
        **kw,
    )
    assert explicit.detection["prior_correction"]["unnamed_refit"] is False
    for key, value in unnamed.model.state_dict().items():
        assert torch.equal(value, explicit.model.state_dict()[key]), key
    text = render_report({"detection": unnamed.detection})
    assert "No search named a backdoor target and the original model favours no class" in text
    # every class Neural Cleanse names passes a bar of -1e9: the knob then changes nothing
    named = {**base, "prior_spare_named": -1e9}
    with_knob = purify(model, _config("cnc", **named, prior_unnamed_ridge=0.1), **kw)
    without = purify(model, _config("cnc", **named, prior_unnamed_ridge=None), **kw)
    rec = with_knob.detection["prior_correction"]
    assert not rec["unnamed_refit"] and rec["reference"] == "cleaned" and rec["spared"]
    assert rec["refit"] is None and rec["head_ridge"] is None
    for key, value in with_knob.model.state_dict().items():
        assert torch.equal(value, without.model.state_dict()[key]), key
    assert "No search named" not in render_report({"detection": with_knob.detection})
    # the original's share names the class it favours most (a bar just under its share):
    # spared, so no refit either
    share = unnamed.detection["prior_correction"]["original_share"]
    top = max(range(4), key=lambda c: share[c])
    bar = 4 * share[top] - 1e-3
    by_share = purify(
        model, _config("cnc", **{**base, "prior_name_share": bar}, prior_unnamed_ridge=0.1), **kw
    )
    rec = by_share.detection["prior_correction"]
    assert rec["named_by_share"] == [top] and rec["spared"] == [top] and not rec["unnamed_refit"]
    assert rec["shift"][top] == 0.0 and rec["refit"] is None
    text = render_report({"detection": by_share.detection})
    assert f"Named by the original model's share of the synthetic images: class {top}" in text


@dataclasses.dataclass
class _ShareCase:
    """A tiny model, fixed synthetic images, the class its share favours (``top``) named
    alone by a ``prior_name_share`` bar just under it, another class, and proxies built as
    if Neural Cleanse had named a given class at a given anomaly index."""

    model: nn.Module
    images: torch.Tensor
    share: torch.Tensor
    top: int
    other: int
    knobs: dict[str, object]
    found: ProxySet

    def named(self, cls: int, anomaly: float) -> ProxySet:
        assert self.found.inversion is not None
        inv = dataclasses.replace(self.found.inversion, suspected_target=cls, anomaly_index=anomaly)
        gen = torch.Generator().manual_seed(_config("cnc").proxy.seed)
        return proxies_from_inversion(
            self.model, self.images, inv, mean=0.5, std=0.25, generator=gen
        )


def _share_case() -> _ShareCase:
    model = _model()
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        share = torch.softmax(model(images), 1).mean(0)
    top = int(share.argmax())
    knobs = dict(LOOSE_CLEANING, prior_name_share=4 * float(share[top]) - 1e-3)
    found = make_proxies(model, images, _config("cnc", **knobs).proxy, mean=0.5, std=0.25)
    return _ShareCase(model, images, share, top, (top + 1) % 4, knobs, found)


def test_share_steers_neural_cleanse_where_it_is_unsure() -> None:
    """``share_steers_inversion``: where Neural Cleanse's anomaly index is under its
    threshold and the original's share names one other class, that class's inverted trigger
    is stamped and drives the cleaning; a confident Neural Cleanse keeps its class."""
    case = _share_case()
    model, images, top, other, found = case.model, case.images, case.top, case.other, case.found
    assert found.inversion is not None
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    knobs = dict(case.knobs, share_steers_inversion=True)
    config = _config("cnc", **knobs)
    unsure_on = case.named

    steered = purify(model, config, synthetic=images, proxies=unsure_on(other, 0.5), **kw)
    det = steered.detection
    assert det["share_steer"]["neural_cleanse"] == other and det["share_steer"]["target"] == top
    assert det["trigger_inversion"]["suspected_target"] == other  # Neural Cleanse's own
    assert steered.suspected_target == top and det["teacher_cleaning"]["target"] == top
    text = render_report({"detection": det})
    assert f"Neural Cleanse's pick, class {other}, was unsure (anomaly index 0.50)" in text
    assert f"so class {top}'s inverted trigger was used as the suspected one" in text
    # the proxies carry the share's class's inverted trigger in place of Neural Cleanse's
    from cnc_core.purify.pipeline import _steer_inversion

    moved, _ = _steer_inversion(images, unsure_on(other, 0.5), (top, 0.3), config, 0.5, 0.25)
    inv = found.inversion
    expected = apply_trigger(
        images, inv.masks[top : top + 1], inv.patterns[top : top + 1], mean=0.5, std=0.25
    )
    assert torch.equal(moved.images, expected) and moved.suspected_target == top
    # no steering where Neural Cleanse names the share's class itself
    direct = purify(model, config, synthetic=images, proxies=unsure_on(top, 0.5), **kw)
    assert "share_steer" not in direct.detection
    sure = purify(model, config, synthetic=images, proxies=unsure_on(other, 3.0), **kw)
    assert "share_steer" not in sure.detection
    assert sure.detection["teacher_cleaning"]["target"] == other
    off = _config("cnc", **dict(knobs, share_steers_inversion=False))
    plain = purify(model, off, synthetic=images, proxies=unsure_on(other, 0.5), **kw)
    assert "share_steer" not in plain.detection
    assert plain.detection["teacher_cleaning"]["target"] == other
    # a warp past its gate (here any warp) is the stronger evidence: no steering
    warped = _config("cnc", **knobs, warp_min_reach=0.0, warp_use="finetune")
    kept = purify(model, warped, synthetic=images, proxies=unsure_on(other, 0.5), **kw)
    det = kept.detection
    assert det["warp_inversion"]["passed"]
    assert det["share_steer"]["skipped"].startswith("a warp past its gate names class")
    assert det["teacher_cleaning"]["target"] == other
    text = render_report({"detection": det})
    assert f"where Neural Cleanse's unsure pick is class {other}; its trigger was kept" in text


def test_all_to_one_skip_of_the_searches_needs_the_share_where_asked() -> None:
    """``all_to_one_needs_share``: Neural Cleanse's anomaly index past
    ``permutation_max_anomaly`` skips the all-to-all searches only where the original's
    share names its class too."""
    case = _share_case()
    model, images, share, top, other = case.model, case.images, case.share, case.top, case.other
    kw = dict(mean=0.5, std=0.25, input_shape=(3, 16, 16))
    knobs = case.knobs
    config = _config("cnc", **knobs, all_to_one_needs_share=True)

    def sure_on(cls: int) -> ProxySet:
        return case.named(cls, 3.0)

    ran = purify(model, config, synthetic=images, proxies=sure_on(other), **kw).detection
    assert ran["all_to_one_unconfirmed"] == {
        "neural_cleanse": other,
        "anomaly_index": 3.0,
        "share": round(float(share[other]), 4),
    }
    assert "skipped" not in ran["permutation_inversion"]
    text = render_report({"detection": ran})
    assert f"Neural Cleanse's class {other} has an all-to-one anomaly index (3.00)" in text
    confirmed = purify(model, config, synthetic=images, proxies=sure_on(top), **kw).detection
    assert "all_to_one_unconfirmed" not in confirmed
    assert "an all-to-one target" in confirmed["permutation_inversion"]["skipped"]
    off = _config("cnc", **knobs)
    plain = purify(model, off, synthetic=images, proxies=sure_on(other), **kw).detection
    assert "all_to_one_unconfirmed" not in plain
    assert "an all-to-one target" in plain["permutation_inversion"]["skipped"]
