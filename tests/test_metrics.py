"""TOFU metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from jobs.evaluate import metrics as M

LN2 = math.log(2.0)


def test_answer_prob_is_length_normalised():
    # 1 token with nll ln 2 -> 0.5; 3 tokens with nll 3 ln 4 -> exp(-ln 4) = 0.25; nll 0 -> 1.
    p = M.answer_prob([LN2, 3 * math.log(4.0), 0.0], [1, 3, 5])
    np.testing.assert_allclose(p, [0.5, 0.25, 1.0])


def test_answer_prob_without_tokens_is_nan():
    assert np.isnan(M.answer_prob([1.0], [0])[0])


def _ratios():
    # Example 0: paraphrase 2 tokens, nll 2 ln 2 -> p~ = 0.5.
    #   perturbed: 1 token nll ln 2 -> 1/2; 3 tokens nll 9 ln 2 -> 1/8; 2 tokens nll 4 ln 2 -> 1/4.
    #   geometric mean (1/2 * 1/8 * 1/4)^(1/3) = (1/64)^(1/3) = 1/4  (arithmetic would be 7/24)
    #   R = (1/4) / (1/2) = 0.5
    # Example 1: paraphrase 1 token nll ln 4 -> 1/4; perturbed all 1/2 -> R = 2.
    para_nll, para_n = [2 * LN2, 2 * LN2], [2, 1]
    pert_nll = [[LN2, 9 * LN2, 4 * LN2], [LN2, 2 * LN2, 3 * LN2]]
    pert_n = [[1, 3, 2], [1, 2, 3]]
    return M.truth_ratio_raw(para_nll, para_n, pert_nll, pert_n)


def test_truth_ratio_raw_uses_geometric_mean_of_normalised_probs():
    np.testing.assert_allclose(_ratios(), [0.5, 2.0], rtol=1e-8)


def test_truth_ratio_raw_skips_padding_in_ragged_lists():
    # third perturbed answer missing (NaN, n = 0): GM(1/2, 1/8) = sqrt(1/16) = 1/4; / 0.5 -> 0.5
    r = M.truth_ratio_raw([2 * LN2], [2], [[LN2, 9 * LN2, np.nan]], [[1, 3, 0]])
    np.testing.assert_allclose(r, [0.5], rtol=1e-8)


def test_truth_ratio_is_tofus_exact_ratio_when_paraphrase_prob_vanishes():
    # p~(para) = exp(-30) ~ 9.4e-14: TOFU's R = exp(30 - ln 2) = 0.5 e^30 ~ 5.3e12, in log space.
    # open-unlearning's p~(pert) / (p~(para) + 1e-10) would cap it near 0.5 / 1e-10 = 5e9.
    r = M.truth_ratio_raw([30.0], [1], [[LN2]], [[1]])
    np.testing.assert_allclose(r, [0.5 * math.exp(30)], rtol=1e-9)
    assert r[0] > 1000 * 0.5 / 1e-10
    # p~(para) = exp(-1000) underflows in linear space: the ratio overflows to inf, which the aggregates
    # count as a truth far less likely (forget: min(inf, 0) = 0; retain: max(0, 1 - inf) = 0)
    big = M.truth_ratio_raw([1000.0], [1], [[LN2]], [[1]])
    assert M.closer_to_1_better(big) == 0.0 and M.true_better(big) == 0.0


def test_normalized_prob_is_true_over_true_plus_perturbed():
    # true: 2 tokens, nll 2 ln 2 -> p~ = 1/2; perturbed: 1/4 (1 token, ln 4) and 1/4 (2 tokens, 2 ln 4)
    #   -> (1/2) / (1/2 + 1/4 + 1/4) = 1/2
    # second row: true 1/2, one perturbed 1/2 and a padded slot -> (1/2) / (1/2 + 1/2) = 1/2; true 1 vs 1/2 -> 2/3
    p = M.normalized_prob(
        [2 * LN2, LN2, 0.0],
        [2, 1, 3],
        [[math.log(4), 2 * math.log(4)], [LN2, np.nan], [LN2, np.nan]],
        [[1, 2], [1, 0], [1, 0]],
    )
    np.testing.assert_allclose(p, [0.5, 0.5, 2 / 3], rtol=1e-12)


def test_truth_ratio_aggregates():
    r = _ratios()  # [0.5, 2.0]
    # forget: mean(min(0.5, 1/0.5), min(2, 1/2)) = mean(0.5, 0.5) = 0.5
    assert M.closer_to_1_better(r) == pytest.approx(0.5)
    # retain: mean(max(0, 1 - 0.5), max(0, 1 - 2)) = mean(0.5, 0) = 0.25
    assert M.true_better(r) == pytest.approx(0.25)
    # median of {0.5, 2} = 1.25; mean of logs = (ln 0.5 + ln 2) / 2 = 0
    assert M.truth_ratio_median(r) == pytest.approx(1.25)
    assert M.truth_ratio_logmean(r) == pytest.approx(0.0, abs=1e-9)


def test_rouge_l_recall():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words; reference has 6 -> 3/6.
    r = M.rouge_l_recall(["the cat sat", "the mat"], ["the cat sat on the mat", "a dog"])
    np.testing.assert_allclose(r, [3 / 6, 0.0])
    # stemming: "sitting cats" vs "cat" -> "cat" matches "cats" -> recall 1/1
    assert M.rouge_l_recall(["sitting cats"], ["cat"])[0] == pytest.approx(1.0)


def test_forget_quality():
    a = np.linspace(0.1, 2.0, 10)
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    # disjoint samples of 10 and 10: D = 1, exact two-sided p = 2 / C(20, 10) = 2 / 184756
    p = M.forget_quality(np.arange(10) + 1.0, np.arange(10) + 100.0)
    assert p == pytest.approx(2 / math.comb(20, 10), rel=1e-6)
    assert p < 1e-4
    # open-unlearning tests 1/(R + 1e-10): same ranks, same p-value
    b = np.linspace(0.5, 3.0, 12)
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(M.forget_quality(a, b))


def test_model_utility_is_harmonic_mean():
    # 2 / (1/0.5 + 1/1.0) = 2 / 3
    assert M.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    # 3 / (1/0.5 + 1/0.25 + 1/1) = 3 / 7
    assert M.model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)
    assert M.model_utility([0.5, 0.0, 1.0]) == 0.0
