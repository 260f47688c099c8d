"""The robustness summary: each attack's recovery against the base model, computed by hand, and where it shows
(report groups, report.json's ``robustness``, the summary line, the tune objective)."""

import math

import pytest

from jobs.evaluate.suites import WORST_RECOVERY, add_reference_metrics, get_suite, metric_group, recovery
from orchestrator.config.objective import Objective, objective_value
from orchestrator.stages.report import group_columns, robustness_summary, summary_lines


def test_recovery_by_hand():
    # an attack that leaves the base as it was (A = U = 0.9): unlearning brought 0.9 to 0.1, the attack back to
    # 0.5: half of what was removed, the (attacked - unlearned) / (base - unlearned)
    assert recovery(0.5, 0.1, 0.9, 0.9) == pytest.approx(0.4 / 0.8)
    assert recovery(0.1, 0.1, 0.9, 0.9) == 0.0  # the attack recovers nothing
    assert recovery(0.05, 0.1, 0.9, 0.9) == 0.0  # the attack made it forget more: clipped to 0
    assert recovery(0.95, 0.1, 0.9, 0.9) == 1.0  # above the base: clipped to 1
    # an attack that raises every model's score: a prefix takes the base from 0.004 to 0.1 (25x). An unlearned
    # model at 0.0005 that the prefix also lifts 25x (to 0.0125) recovered nothing: 0.0125 / 0.1 = 0.0005 / 0.004
    assert recovery(0.0125, 0.0005, 0.1, 0.004) == pytest.approx(0.0, abs=1e-12)
    # lifted to 0.05 instead: (0.05 / 0.1 - 0.125) / (1 - 0.125) = 0.375 / 0.875
    assert recovery(0.05, 0.0005, 0.1, 0.004) == pytest.approx(0.375 / 0.875)
    assert recovery(0.5, 0.9, 0.9, 0.9) is None  # nothing was forgotten: nothing to recover
    assert recovery(0.5, 0.95, 0.9, 0.9) is None
    assert recovery(None, 0.1, 0.9, 0.9) is None and recovery(0.5, math.nan, 0.9, 0.9) is None
    assert recovery(0.5, 0.1, 0.0, 0.9) is None  # the base scores 0 under the attack: no scale


def test_every_attack_suite_declares_its_recovery_against_its_own_unattacked_metric():
    suites = ("relearn", "quant", "probes", "lens")
    declared = {r.metric: (r.attacked, r.unlearned) for s in suites for r in get_suite(s).recoveries}
    assert declared == {
        "relearn_recovery": ("relearn_forget_prob", "relearn_before_prob"),
        "quant8_recovery": ("quant8_forget_prob", "quant_fp_forget_prob"),
        "quant4_recovery": ("quant4_forget_prob", "quant_fp_forget_prob"),
        "probes_recovery": (r"probe_(?!direct_prob$|worst_prob$).+_prob", "probe_direct_prob"),
        "lens_recovery": ("lens_max_prob", "lens_last_prob"),
    }
    assert {metric_group(m) for m in (*declared, WORST_RECOVERY, "relearn_gain")} == {"Robustness"}


def results() -> dict:
    m = lambda **kw: {"metrics": kw, "raw": {}}
    return {
        "base": m(quant_fp_forget_prob=0.9, quant4_forget_prob=0.8, probe_direct_prob=0.4, probe_role_play_prob=0.8),
        "oracle": m(quant_fp_forget_prob=0.2, quant4_forget_prob=0.2, probe_direct_prob=0.2, probe_role_play_prob=0.2),
        "merged": m(quant_fp_forget_prob=0.1, quant4_forget_prob=0.5, probe_direct_prob=0.1, probe_role_play_prob=0.5),
        "unsplit": m(
            quant_fp_forget_prob=0.1,
            quant4_forget_prob=0.05,
            probe_direct_prob=0.04,
            probe_role_play_prob=0.2,
            probe_worst_prob=0.2,  # the largest kind, not a kind: not an attack of its own
            probe_reverse_query_prob=0.08,  # the base has no value of this kind: left out
        ),
    }


def test_recoveries_are_added_against_the_base_with_the_worst_over_attacks():
    res = results()
    add_reference_metrics(res)
    merged, unsplit = res["merged"]["metrics"], res["unsplit"]["metrics"]
    # quant4: (0.5 / 0.8 - 0.1 / 0.9) / (1 - 0.1 / 0.9)
    assert merged["quant4_recovery"] == pytest.approx((0.5 / 0.8 - 1 / 9) / (1 - 1 / 9))
    # probes: role_play (0.5 / 0.8 - 0.1 / 0.4) / (1 - 0.1 / 0.4) = 0.375 / 0.75
    assert merged["probes_recovery"] == pytest.approx(0.5)
    assert merged[WORST_RECOVERY] == pytest.approx(max(0.5, (0.5 / 0.8 - 1 / 9) / (1 - 1 / 9)))
    assert unsplit["quant4_recovery"] == 0.0
    # (0.2 / 0.8 - 0.04 / 0.4) / (1 - 0.1) = 0.15 / 0.9
    assert unsplit["probes_recovery"] == pytest.approx(0.15 / 0.9)
    assert unsplit[WORST_RECOVERY] == pytest.approx(0.15 / 0.9)
    assert "quant8_recovery" not in merged  # that bit width was not scored
    assert not any(k.endswith("_recovery") for k in res["base"]["metrics"])  # the base is the reference
    # without a base among the results, the caller's base serves (step selection scores one step at a time)
    step = {"step": results()["merged"]}
    add_reference_metrics(step, base=results()["base"])
    assert step["step"]["metrics"][WORST_RECOVERY] == merged[WORST_RECOVERY]


def test_the_report_groups_summarises_and_names_the_most_robust_model():
    res = results()
    add_reference_metrics(res)
    res["merged"]["info"] = {"quant_scheme": "bitsandbytes NF4", "probe_worst_kind": "role_play"}
    res["unsplit"]["info"] = {"quant_scheme": "bitsandbytes NF4", "probe_worst_kind": "in_context"}
    models = {n: r["metrics"] for n, r in res.items()}
    cols = group_columns({k for m in models.values() for k in m})
    assert {"quant4_recovery", "probes_recovery", WORST_RECOVERY} <= set(cols["Robustness"])
    summary = robustness_summary(models, res)
    assert summary["recovery"]["merged"]["worst_attack"] == "quant4_recovery"
    assert summary["recovery"]["merged"][WORST_RECOVERY] == pytest.approx(0.578125)
    assert "base" not in summary["recovery"]
    assert summary["most_robust"] == "unsplit"  # 0.17 < 0.58; the oracle is not a candidate
    assert summary["info"] == {"quant_scheme": "bitsandbytes NF4"}  # what the models share
    assert summary["recovery"]["unsplit"]["info"]["probe_worst_kind"] == "in_context"
    line = next(x for x in summary_lines({"robustness": summary}) if x.startswith("robustness:"))
    assert "merged 0.578 (quant4)" in line and "unsplit is the most robust" in line
    assert "quant_scheme: bitsandbytes NF4" in summary_lines({"robustness": summary})


def test_a_recovery_can_be_the_objective_of_tune_and_of_step_selection():
    res = results()
    add_reference_metrics(res)
    obj = Objective(metric=WORST_RECOVERY, mode="min", model="merged")
    assert objective_value(obj, res["merged"]["metrics"], res["base"]["metrics"])["objective"] == pytest.approx(
        0.578125
    )
    weighted = Objective(weights={"quant4_recovery": 1.0, "probes_recovery": 1.0}, mode="min")
    assert objective_value(weighted, res["merged"]["metrics"], {})["objective"] == pytest.approx(1.078125)


def test_the_benchmark_table_pairs_merged_with_unsplit_by_seed_and_says_where_a_recovery_is_undefined():
    from benchmarks.robustness import METRICS, markdown_table
    from orchestrator.experiments.seeds import paired_test

    merged = {k: [0.5, 0.6, 0.7] for k in METRICS}
    unsplit = {k: [0.1, 0.1, 0.2] for k in METRICS}
    unsplit["lens_recovery"] = [None, 0.1, 0.2]  # one seed's unsplit model forgot nothing by the lens metric
    per = {"merged": {"values": merged}, "unsplit": {"values": unsplit}}
    per["paired"] = {k: paired_test(merged[k], unsplit[k]) for k in METRICS if k != "lens_recovery"}
    table = markdown_table({"methods": {"npo": per}})
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert set(rows) == set(METRICS)
    # differences 0.4, 0.5, 0.5: mean 0.467, paired t-test t = 14 with 2 degrees of freedom, p = 0.0051
    assert "+0.467" in rows["forget_prob"] and "**0.0051**" in rows["forget_prob"]
    assert rows["lens_recovery"].endswith("| n/a | - | - |")


def test_a_suite_names_which_attacks_a_recovery_takes_through_its_parts():
    # a reverse query reads as known on any model (its prompt gives the question away): the probes suite leaves
    # it out of parts["probes_recovery"], and the recovery then ignores it though the pattern matches it
    base = {"metrics": {"probe_direct_prob": 0.8, "probe_role_play_prob": 0.8, "probe_reverse_query_prob": 0.6}}
    model = {
        "metrics": {"probe_direct_prob": 0.1, "probe_role_play_prob": 0.1, "probe_reverse_query_prob": 0.6},
        "parts": {"probes_recovery": ["probe_role_play_prob"]},
    }
    (rec,) = get_suite("probes").recoveries
    assert rec.compute(model, base) == 0.0
    assert rec.compute({"metrics": model["metrics"]}, base) == 1.0  # without parts: every matching kind
