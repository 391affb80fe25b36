"""``report.md``: the job report (``report.json``) as a page a person reads.

Rendered from the same dictionary that becomes ``report.json``, so the two never disagree:
what was run, what it saved (parameters, MACs, latency, the ONNX check), what the data-free
backdoor detection found before and after purification, the user's own evaluation when one
was asked for, how long each stage took, and the layers with their kept ranks. Plots are
linked by their relative paths (``plots/*.png``), which hold beside the report in a job's
output folder and in the service's artifact list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_report", "write_report_md"]

#: The layer table lists at most this many layers (the largest first); report.json has all.
MAX_LAYER_ROWS = 40


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _top(counts: Sequence[int]) -> str:
    """``class k (n of N)`` for a class histogram."""
    total = sum(counts)
    if not total:
        return "no image changed class"
    k = max(range(len(counts)), key=lambda i: counts[i])
    return f"class {k} ({counts[k]} of {total}, {100 * counts[k] / total:.0f}%)"


def _summary(report: dict[str, Any]) -> list[str]:
    job, metrics = report.get("job", {}), report.get("metrics", {})
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = [
        ("parameters", f"{before.get('params', 0):,}", f"{after.get('params', 0):,}"),
        ("MACs", f"{before.get('macs', 0):,}", f"{after.get('macs', 0):,}"),
        ("size (bytes)", f"{before.get('size_bytes', 0):,}", f"{after.get('size_bytes', 0):,}"),
    ]
    for b, a in zip(before.get("latency", []), after.get("latency", []), strict=False):
        rows.append(
            (
                f"latency, batch {b['batch_size']} ({b['device']}, median ms)",
                f"{b['median_ms']:.2f}",
                f"{a['median_ms']:.2f}",
            )
        )
    lines = [
        f"Method `{job.get('method')}`, architecture `{job.get('arch')}` (width "
        f"{job.get('width') or 'standard'}), {job.get('num_classes')} classes, input "
        f"{job.get('in_chans')}x{job.get('input_size')}x{job.get('input_size')}, ratio "
        f"{job.get('ratio')}, seed {job.get('seed')}; ran on {report.get('device')} "
        f"(cnc {report.get('cnc_version')}, torch {report.get('torch_version')}).",
        "",
        *_table(("", "original", "compact"), rows),
    ]
    ratios = metrics.get("ratios", {})
    if ratios:
        lines += [", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()) + ".", ""]
    onnx = report.get("onnx")
    if onnx:
        lines += [
            f"ONNX export checked with ONNX Runtime: "
            f"{'passed' if onnx.get('passed') else 'FAILED'} (largest difference from PyTorch "
            f"{onnx.get('max_abs_diff', float('nan')):.2e}).",
            "",
        ]
    return lines


def _detection(report: dict[str, Any]) -> list[str]:
    det = report.get("detection") or {}
    if not det:
        return []
    lines = ["## Backdoor detection (data-free)", ""]
    if report.get("suspected_target") is not None:
        lines += [f"**Suspected backdoor target: class {report['suspected_target']}.**", ""]
    inv = det.get("trigger_inversion")
    if inv:
        lines += [
            "Trigger inversion (Neural Cleanse on synthetic images): the smallest mask that "
            "flips the images to a class; a backdoor target needs an anomalously small one "
            f"(anomaly index {inv['anomaly_index']:.2f}; Neural Cleanse flags above 2).",
            "",
            *_table(
                ("class", "mask L1", "anomaly index", "flip rate"),
                (
                    (k, f"{n:.1f}", f"{a:.2f}", _pct(s))
                    for k, (n, a, s) in enumerate(
                        zip(inv["mask_norms"], inv["anomaly_indices"], inv["success"], strict=False)
                    )
                ),
            ),
        ]
    steer = det.get("share_steer")
    if steer and steer.get("skipped"):
        lines += [
            f"The original model gives class {steer['target']} {_pct(steer['share'])} of its "
            f"mean softmax on the synthetic images where Neural Cleanse's unsure pick is "
            f"class {steer['neural_cleanse']}; its trigger was kept, since "
            f"{steer['skipped']}.",
            "",
        ]
    elif steer:
        lines += [
            f"Neural Cleanse's pick, class {steer['neural_cleanse']}, was unsure (anomaly index "
            f"{steer['anomaly_index']:.2f}); the original model gives class {steer['target']} "
            f"{_pct(steer['share'])} of its mean softmax on the synthetic images, so class "
            f"{steer['target']}'s inverted trigger was used as the suspected one.",
            "",
        ]
    unconfirmed = det.get("all_to_one_unconfirmed")
    if unconfirmed:
        lines += [
            f"Neural Cleanse's class {unconfirmed['neural_cleanse']} has an all-to-one "
            f"anomaly index ({unconfirmed['anomaly_index']:.2f}), but the original model gives "
            f"it only {_pct(unconfirmed['share'])} of its mean softmax on the synthetic "
            "images, as it would not an all-to-one target: the all-to-all searches ran.",
            "",
        ]
    cleaning = det.get("teacher_cleaning")
    if cleaning and cleaning.get("skipped"):
        lines += [f"Teacher cleaning: skipped; {cleaning['skipped']}.", ""]
    elif cleaning:
        lines += [
            f"Teacher cleaning: {cleaning.get('rounds_applied', 0)} of "
            f"{len(cleaning.get('rounds', []))} round(s) applied; the cleaned model agrees with "
            f"the original on {_pct(cleaning.get('agreement_with_original'))} of the synthetic "
            "images."
            + (
                " It pruned by the all-to-all trigger; its 'target' is each class's image under "
                "that trigger's mapping."
                if cleaning.get("trigger") == "all-to-all"
                else f" It pruned by the warp trigger, whose class {cleaning.get('target')} is "
                "the target."
                if cleaning.get("trigger") == "warp"
                else ""
            ),
            "",
        ]
        for i, rnd in enumerate(cleaning.get("rounds", []), 1):
            undone = rnd.get("undone")
            if undone == "mask_growth":
                verdict = (
                    f"undone (the re-inverted trigger's mask grew only "
                    f"{rnd.get('mask_growth', 0.0):.2f}x: the pruning did not reach the trigger)"
                )
            elif undone == "flip":
                verdict = (
                    f"undone (the stamped trigger still reached the target on "
                    f"{_pct(rnd.get('flip_after'))} of the images: the pruning did not reach "
                    "the trigger)"
                )
            elif undone == "reach_cut":
                verdict = (
                    f"undone (the stamped trigger's reach fell only from "
                    f"{_pct(rnd.get('flip_before'))} to {_pct(rnd.get('flip_after'))}: the "
                    "pruning did not reach the trigger)"
                )
            elif undone:
                verdict = "undone (the model lost its clean function)"
            else:
                verdict = "kept"
            growth = rnd.get("mask_growth")
            flips = (rnd.get("flip_before"), rnd.get("flip_after"))
            backoff = rnd.get("backoff")
            lines.append(
                f"- round {i}: {rnd.get('suppressed', 0)} channels pruned, agreement "
                f"{_pct(rnd.get('agreement'))}"
                + (
                    f" (trimmed from {backoff['planned']} channels, which left agreement "
                    f"{_pct(backoff['agreement_planned'])})"
                    if backoff
                    else ""
                )
                + (
                    f", stamped trigger reaches the target {_pct(flips[0])} -> {_pct(flips[1])}"
                    if None not in flips
                    else ""
                )
                + (f", trigger mask {growth:.2f}x larger after" if growth is not None else "")
                + f", {verdict}"
            )
        lines.append("")
    lines += _all_to_all_lines(
        det.get("permutation_inversion"),
        "Permutation trigger (the all-to-all proxy)",
        "one mask + pattern that moves each class to another; mask L1",
    )
    lines += _all_to_all_lines(
        det.get("dynamic_inversion"),
        "Dynamic trigger (the input-aware all-to-all proxy)",
        "a generator of one mask + pattern per image that moves each class to another; "
        "mean mask L1",
    )
    lines += _warp_lines(det.get("warp_inversion"))
    drawn = det.get("target_synthesis")
    if drawn and drawn.get("skipped"):
        lines += [f"Target-class images: none drawn; {drawn['skipped']}.", ""]
    elif drawn:
        lines += [
            f"Target-class images: {drawn['images']} images of class {drawn['target']} drawn "
            "from the cleaned model joined fine-tuning; it calls "
            f"{_pct(drawn['cleaned_says_target'])} of them the target, the original "
            f"{_pct(drawn['original_says_target'])}.",
            "",
        ]
    if "finetune_selection" in det:
        lines += [f"Fine-tuning kept the {det['finetune_selection']}.", ""]
    apart = det.get("all_to_all_stamp")
    if apart:
        # session-16 reports marked a blend with ``"blend": true`` instead of ``"shape"``
        shape = apart.get("shape") or ("blend" if apart.get("blend") else "")
        lines += [
            ("The warp trigger" if shape == "warp" else "The all-to-all trigger")
            + {"blend": " (a whole-image blend)", "patch": " (a patch)"}.get(shape, "")
            + " was unlearnt apart from the inverted ones: half the stamped images, in the "
            f"{apart['batch']} batch mode, at weight {apart['weight']:g}.",
            "",
        ]
    if "sensitivity_suppressed" in det:
        lines += [
            f"Rank sensitivity: {det['sensitivity_suppressed']} rank components that respond "
            "to the inverted trigger far more than to clean synthetic images were pruned.",
            "",
        ]
    lines += _prior_lines(det.get("prior_correction"))
    hists = det.get("histograms", {})
    rows = []
    for when in ("before", "after"):
        pgd = det.get(f"pgd_{when}")
        if pgd is not None:
            counts = hists.get(f"adversarial_{when}", [])
            plot = f"plots/adversarial_{when}.png"
            rows.append((f"PGD proxies, {when}", _top(counts), f"[{plot}]({plot})"))
    if "inverted_trigger_after_share" in det:
        rows.append(
            (
                "inverted trigger, after",
                f"{_pct(det['inverted_trigger_after_share'])} still go to the target",
                "-",
            )
        )
    if rows:
        lines += [
            "Where adversarial synthetic images go (a backdoored model sends them to its "
            "target; after purification they should spread over natural neighbours):",
            "",
            *_table(("signal", "top class", "plot"), rows),
        ]
    if "clp_pruned" in det:
        lines += [f"CLP pruned {det['clp_pruned']} channels.", ""]
    return lines


def _residual(report: dict[str, Any]) -> list[str]:
    """The data-free check of the purified model (``detection.verify``), as a verdict."""
    rec = (report.get("detection") or {}).get("verify")
    if not rec:
        return []
    k = rec["class"]
    i = rec["classes"].index(k)
    facts = (
        f"class {k}'s mask L1 {rec['mask_norms'][i]:.1f} on the purified model, "
        f"{rec['mask_growth'][i]:.2f}x its size on the original and "
        f"{rec['relative_growth'][i]:.2f}x the median class's growth (bar "
        f"{rec['min_relative_growth']:g}x); anomaly index {rec['original_anomaly_indices'][i]:.2f} "
        f"before, {rec['anomaly_indices'][i]:.2f} after"
    )
    shares = (rec.get("blend_reach") or {}).get(str(k))
    if shares is not None:
        facts += (
            f"; its mean-difference blend (opacity {rec['blend_alpha']:g}) sends "
            f"{_pct(shares[0])} of the other images to it on the original, {_pct(shares[1])} "
            f"on the purified model (bar: {rec['max_blend_kept']:g} of the original's)"
        )
    new = rec.get("new_outliers") or []
    note = (
        f" Outliers on the purified model only: class {', '.join(map(str, new))} (compression "
        "moves the natural classes' masks; not taken as a backdoor)."
        if new
        else ""
    )
    untreated = rec.get("untreated_outliers") or []
    if untreated:
        note += (
            f" Also an outlier on the original but not the class treated: class "
            f"{', '.join(map(str, untreated))} (not checked: Neural Cleanse also sets natural "
            "classes apart, and a natural class would fail the check, since nothing removed "
            "it; it cannot tell a second target from one)."
        )
    limit = (
        " The check cannot see an all-to-all or input-dependent backdoor: Neural Cleanse "
        "gives it no outlier even before purification."
    )
    if rec["verdict"] == "residual":
        reasons = (rec.get("reasons") or {}).get(str(k), ["mask"])
        why = " and ".join(
            {
                "mask": "its trigger is hardly larger than before",
                "blend": "the blend of its images still reaches it",
            }[r]
            for r in reasons
        )
        return [
            "## Residual check: removal unconfirmed",
            "",
            f"**Warning: the backdoor to class {k} may remain.** Neural Cleanse found an "
            f"anomalously small trigger for class {k} on the original model; on the purified "
            f"model {why} ({facts}). Test the model on triggered data of your own "
            "(`--eval-poisoned`) before you ship it." + note,
            "",
        ]
    if rec["verdict"] == "cleared":
        checked = ", ".join(map(str, rec["checked"]))
        return [
            "## Residual check: cleared",
            "",
            f"Neural Cleanse's outlier on the original (class {checked}) no longer stands out: "
            f"re-run on the purified model, its trigger has grown far more than the other "
            f"classes'{' and the blend of its images lost its reach' if shares else ''} "
            f"({facts}). This is evidence, not proof." + limit + note,
            "",
        ]
    return [
        "## Residual check: nothing to check",
        "",
        "Neural Cleanse did not set the class the purification treated apart on the original "
        f"model (anomaly index under {rec['anomaly_threshold']:g}), so there is nothing it can "
        "confirm gone." + limit + note,
        "",
    ]


def _evaluation(report: dict[str, Any]) -> list[str]:
    ev = report.get("evaluation")
    if not ev:
        return []
    return [
        "## Evaluation on your data",
        "",
        *_table(("metric", "%"), ((k, f"{v:.2f}") for k, v in ev.items())),
    ]


def _timings(report: dict[str, Any]) -> list[str]:
    rows = [(k, f"{v:.1f}") for k, v in report.get("timings_s", {}).items()]
    rows += [(f"purify / {k}", f"{v:.1f}") for k, v in report.get("purify_timings_s", {}).items()]
    return ["## Stage timings", "", *_table(("stage", "seconds"), rows)] if rows else []


def _ranks(ranks: Sequence[int] | None) -> str:
    return "x".join(map(str, ranks)) if ranks and any(ranks) else "-"


def _layers(report: dict[str, Any]) -> list[str]:
    layers = report.get("layers") or []
    if not layers:
        return []
    biggest = sorted(layers, key=lambda d: -d.get("params_before", 0))[:MAX_LAYER_ROWS]
    rows = (
        (
            f"`{d['name']}`",
            d.get("kind", ""),
            _ranks(d.get("full_ranks")),
            _ranks(d.get("ranks")),
            f"{d.get('params_before', 0):,}",
            f"{d.get('params_after', 0):,}",
        )
        for d in biggest
    )
    more = len(layers) - len(biggest)
    note = [f"{more} smaller layers are in report.json.", ""] if more > 0 else []
    comp = report.get("compression") or {}
    cfg = comp.get("config") or {}
    how = []
    if cfg.get("allocation"):
        spectra = {"response": "response spectra on the synthetic images"}.get(
            comp.get("spectra", "weight"), f"{comp.get('spectra', 'weight')} spectra"
        )
        how = [
            f"Ranks allocated by `{cfg['allocation']}` on the layers' {spectra}; layers with "
            f"less than {cfg.get('min_layer_share', 0.0):.0%} of the largest layer's weights "
            "kept dense."
            + (
                f" MACs held to 1/{cfg['mac_ratio']:g} of the original's as well."
                if cfg.get("mac_ratio")
                else ""
            ),
            "",
        ]
    return [
        "## Layers (largest first)",
        "",
        *how,
        "![spectra](plots/spectra.png)",
        "",
        *_table(("layer", "kind", "full ranks", "kept ranks", "params", "params after"), rows),
        *note,
    ]


def _all_to_all_lines(record: dict[str, Any] | None, name: str, what: str) -> list[str]:
    """The report's paragraph on one all-to-all trigger search (its detection record)."""
    if not record:
        return []
    if record.get("skipped"):
        return [f"{name}: not searched; {record['skipped']}.", ""]
    verdict = (
        "stamped beside the inverted trigger in unlearning"
        if record["used"]
        else "not used (it moved too few images, or onto a few natural classes)"
    )
    if record.get("replaced_by"):
        verdict = f"replaced by the {record['replaced_by']} trigger, which passed its stricter gate"
    mapping = ", ".join(f"{c}->{t}" for c, t in enumerate(record["mapping"]) if t >= 0)
    restarts = record.get("restarts", [])
    which = (
        f" Restart {record['restart'] + 1} of the {len(restarts)} gated (by the search's "
        "objective, best first) is the one described."
        if len(restarts) > 1
        else ""
    )
    if record.get("stamped", 1) > 1:
        which += f" The triggers of all {record['stamped']} restarts that passed are stamped."
    if record.get("blend"):
        which += " It is a whole-image blend (a restart with a fixed blend mask)."
    return [
        f"{name}: {what} {record['mask_norm']:.1f}, it moved {_pct(record['flip_rate'])} of "
        f"the synthetic images, at most {_pct(record['top_share'])} of them to one class; "
        f"{verdict}. Class mapping: {mapping} (onto {record.get('targets', '?')} classes)." + which,
        "",
    ]


def _prior_lines(record: dict[str, Any] | None) -> list[str]:
    """The report's paragraph on the class-prior correction (its detection record)."""
    if not record:
        return []
    name = "Class-prior correction"
    if record.get("skipped"):
        return [f"{name}: not applied; {record['skipped']}.", ""]
    shift = record["shift"]
    teacher = "cleaned teacher" if record["reference"] == "cleaned" else "original model"
    spared = (
        f" Left out as a named target: class {', '.join(map(str, record['spared']))}."
        if record.get("spared")
        else ""
    )
    if record.get("named_by_share"):
        share = record.get("original_share") or []
        spared += " Named by the original model's share of the synthetic images: " + ", ".join(
            f"class {c} ({_pct(share[c])})" if c < len(share) else f"class {c}"
            for c in record["named_by_share"]
        )
        spared += f" (the bar: {record.get('name_share')}x the uniform share)."
    if record.get("corrected") == []:
        left_out = set(record.get("spared", []))
        ratios = [
            s / max(t, 1e-12)
            for c, (s, t) in enumerate(
                zip(record["student_before"], record["teacher"], strict=True)
            )
            if c not in left_out
        ]
        other = "other " if left_out else ""
        return [
            f"{name}: no {other}class needed it; the student gave every {other}class at least "
            f"{_pct(min(ratios, default=1.0))} of the {teacher}'s share on the clean synthetic "
            f"images (the bar: {_pct(record['avoided_below'])}).{spared}",
            "",
        ]
    if record.get("refit") is not None:  # PurifyConfig.prior_head_ridge / _unnamed_ridge
        classes = record["corrected"]
        unnamed = (
            " No search named a backdoor target and the original model favours no class, so "
            "the rows follow the original model (where a target is named, its logits would "
            "carry the trigger back)."
            if record.get("unnamed_refit")
            else ""
        )
        shares = ", ".join(
            f"class {c} {_pct(record['student_before'][c])} -> "
            f"{_pct(record['student_after'][c])} (the {teacher}: {_pct(record['teacher'][c])})"
            for c in classes
        )
        return [
            f"{name}: the classifier rows of the classes the student avoided were refit to "
            f"the {teacher}'s logits on the clean synthetic images (ridge "
            f"{record.get('head_ridge')}); their share of the probability mass: {shares}."
            + spared
            + unnamed,
            "",
        ]
    c = max(range(len(shift)), key=lambda k: abs(shift[k]))
    return [
        f"{name}: the classifier's biases were shifted so that the student's class "
        f"distribution on the clean synthetic images matches the {teacher}'s. Largest "
        f"shift {shift[c]:+.2f} logits, class {c}: the student gave it "
        f"{_pct(record['student_before'][c])} of its probability mass, the {teacher} "
        f"{_pct(record['teacher'][c])}, after the shift {_pct(record['student_after'][c])}."
        + spared,
        "",
    ]


def _warp_lines(record: dict[str, Any] | None) -> list[str]:
    """The report's paragraph on the warp trigger search (its detection record)."""
    if not record:
        return []
    name = "Warp trigger (the warping-trigger proxy)"
    if record.get("skipped"):
        return [f"{name}: not searched; {record['skipped']}.", ""]
    uses = {
        "finetune": "stamped beside the inverted trigger in unlearning",
        "cleaning": "it drove the teacher cleaning",
        "both": "it drove the teacher cleaning and was stamped in unlearning",
    }
    if record["used"] and record.get("cleaning"):  # "both": stamped, the cleaning not driven
        verdict = f"{uses['finetune']}; the cleaning was {record['cleaning']}"
    elif record["used"]:
        verdict = uses[record.get("use", "finetune")]
    elif record.get("cleaning"):
        verdict = f"not used; the cleaning was {record['cleaning']}"
    else:
        verdict = "not used (it reached too few images)"
    if record.get("inverted"):  # PurifyConfig.misnamed_inverted
        verdict += f"; {record['inverted']}"
    return [
        f"{name}: a smooth warp of at most {record['max_shift']:g} pixel sends "
        f"{_pct(record['reach'])} of the synthetic images of other classes to class "
        f"{record['suspected_target']} (anomaly index {record['anomaly_index']:.1f} among the "
        f"classes); {verdict}.",
        "",
    ]


def render_report(report: dict[str, Any]) -> str:
    """The Markdown page of a job's ``report.json`` dictionary."""
    lines = ["# cnc report", "", "![summary](plots/summary.png)", ""]
    lines += _summary(report)
    lines += _residual(report)
    lines += _detection(report)
    lines += _evaluation(report)
    lines += _timings(report)
    lines += _layers(report)
    return "\n".join(lines).rstrip() + "\n"


def write_report_md(out_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``out_dir/report.md`` and return its path."""
    path = Path(out_dir) / "report.md"
    path.write_text(render_report(report), encoding="utf-8")
    return path
