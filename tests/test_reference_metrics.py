"""Metrics relative to the oracle: forget_quality (KS p-value) and privleak (MUSE), added by the driver."""

import pytest
from scipy.stats import ks_2samp

from jobs.evaluate.suites import add_reference_metrics


def test_forget_quality_and_privleak_are_computed_against_the_oracle():
    results = {  # privleak from the min-k AUC (MUSE's), unless the suite said another attack
        "oracle": {
            "metrics": {"mia_min_k_auc": 0.5, "mia_loss_auc": 0.6},
            "raw": {"forget_truth_ratio": [0.9, 1.0, 1.1, 1.2]},
        },
        "base": {
            "metrics": {"mia_min_k_auc": 1.0, "mia_loss_auc": 0.7},
            "raw": {"forget_truth_ratio": [0.1, 0.2, 0.3, 0.4]},
        },
        "merged": {"metrics": {}, "raw": {"forget_truth_ratio": [0.9, 1.0, 1.1, 1.3]}},
        "unsplit": {"metrics": {"mia_min_k_auc": 0.9, "mia_loss_auc": 0.8}, "raw": {"mia_privleak_attack": "loss"}},
    }
    add_reference_metrics(results)
    assert results["oracle"]["metrics"]["forget_quality"] == pytest.approx(1.0)
    assert results["base"]["metrics"]["forget_quality"] == pytest.approx(
        ks_2samp([0.1, 0.2, 0.3, 0.4], [0.9, 1.0, 1.1, 1.2]).pvalue
    )
    assert results["base"]["metrics"]["forget_quality"] < 0.05
    # MUSE privleak: ((1 - auc) - (1 - auc_oracle)) / (1 - auc_oracle) * 100 -> -100 for a model that kept it all
    assert results["base"]["metrics"]["privleak"] == pytest.approx(-100.0)
    assert results["oracle"]["metrics"]["privleak"] == pytest.approx(0.0)
    assert "privleak" not in results["merged"]["metrics"]  # no mia suite ran for it
    # eval.mia.privleak_attack: loss -> ((1 - 0.8) - (1 - 0.6)) / (1 - 0.6) * 100
    assert results["unsplit"]["metrics"]["privleak"] == pytest.approx((0.2 - 0.4) / 0.4 * 100)


def test_without_an_oracle_nothing_is_added():
    results = {"base": {"metrics": {"forget_prob": 0.9}, "raw": {"forget_truth_ratio": [0.5]}}}
    add_reference_metrics(results)
    assert results["base"]["metrics"] == {"forget_prob": 0.9}
