"""benchmarks/claims.py: the statistics behind docs/results.md's checks of the seed papers' claims, on made-up
job scores (the jobs themselves are the loop's, tested elsewhere)."""

import math
from pathlib import Path

import pytest

from benchmarks import claims

BASE = {"forget_prob": 0.9, "retain_prob": 0.9, "model_utility": 0.7}


def test_localization_compares_each_attribution_with_the_random_mask_of_the_same_seed(monkeypatch, tmp_path):
    forget = {"gradient": 0.5, "activation": 0.7, "wagle": 0.6, "random": 0.8, "none": 0.01}
    calls = []

    def fake(bench, out, method, threads, steps, seed, localize):
        calls.append((out.name, method, localize))
        a = localize["attribution"] if localize else "none"
        # gradient's gap to random grows by 0.01 a seed: differences -0.30, -0.31, -0.32
        fp = forget[a] + (0.01 * seed if a == "random" else 0.0) + (0.02 * seed if a == "gradient" else 0.0)
        return {"scores": {"forget_prob": fp, "retain_prob": 0.9, "model_utility": 0.7 + 0.001 * seed}}

    monkeypatch.setattr(claims, "scored_job", fake)
    res = claims.localization(tmp_path, tmp_path / "work", [0, 1, 2], threads=1, steps=5)
    assert len(calls) == 15 and {c[1] for c in calls} == {"wga"}
    masks = [c[2] for c in calls if c[2]]
    assert all(m["fraction"] == 0.05 and m["scope"] == "mlp" for m in masks)
    assert {(m["attribution"], m["seed"]) for m in masks if m["attribution"] == "random"} == {
        ("random", s) for s in (0, 1, 2)
    }
    rows = {r["attribution"]: r for r in res["rows"]}
    g = rows["gradient"]["forget_prob_minus_random"]
    # paired differences 0.5+0.02s - (0.8+0.01s) = -0.30, -0.29, -0.28: mean -0.29, sd 0.01, t = -0.29/(0.01/sqrt 3)
    assert g["mean"] == pytest.approx(-0.29)
    t = -0.29 / (0.01 / math.sqrt(3))
    assert g["t"] == pytest.approx(t, rel=1e-6)
    assert g["p_value"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-6)  # Student t, 2 df
    # identical retain scores: no variance, no test
    assert rows["wagle"]["retain_prob_minus_random"]["p_value"] is None
    assert "forget_prob_minus_random" not in rows["random"] and "forget_prob_minus_random" not in rows["none"]
    assert rows["none"]["forget_prob"]["mean"] == pytest.approx(0.01)
    table = claims.localization_table(res)
    assert "| gradient | 0.520 ± " in table and "-0.290 (p " in table and "| none (every parameter) |" in table


def test_lr_grid_counts_the_learning_rates_where_a_method_collapses_keeps_or_is_usable(monkeypatch, tmp_path):
    def fake(bench, out, method, threads, steps, lr, seed, retain):
        if method == "ga":  # collapses from 3e-4 on, keeps the answers at 3e-5
            return {
                "scores": {
                    "forget_prob": 0.6 if lr < 1e-4 else 0.0,
                    "retain_prob": 0.5,
                    "model_utility": 0.1 if lr >= 3e-4 else 0.6,
                }
            }
        # everything else usable everywhere; utility moves with the seed
        return {"scores": {"forget_prob": 0.1, "retain_prob": 0.8, "model_utility": 0.6 + 0.1 * seed}}

    monkeypatch.setattr(claims, "scored_job", fake)
    res = claims.lr_grid(Path(tmp_path), tmp_path / "work", [0, 1], threads=1, steps=5, base=BASE)
    rows = {r["method"]: r for r in res["rows"]}
    assert len(rows) == 7 and res["lrs"] == list(claims.LRS)
    ga = rows["ga"]
    assert (ga["collapsed_lrs"], ga["kept_forget_lrs"], ga["usable_lrs"]) == (3, 1, 1)  # lr 1e-4 alone usable
    assert ga["spread"]["forget_prob"] == pytest.approx(0.6) and ga["spread"]["model_utility"] == pytest.approx(0.5)
    gd = rows["grad_diff (in-distribution)"]
    assert gd["usable_lrs"] == 5 and gd["per_lr"][0]["model_utility"] == pytest.approx(0.65)  # mean of 0.6, 0.7
    assert rows["ga_kl (general)"]["retain"] == "general"
    assert "| ga | 0.600 / 0.600 |" in claims.lr_grid_table(res)


def test_seeds_table_tables_only_variants_with_every_seed_and_bolds_significant_p(monkeypatch, tmp_path, capsys):
    import json

    from benchmarks import seeds_table

    def report(forget_merged, forget_unsplit):
        return {
            "models": {
                "base": {"forget_prob": 0.9, "model_utility": 0.5},
                "merged": {"forget_prob": forget_merged, "model_utility": 0.5},
                "unsplit": {"forget_prob": forget_unsplit, "model_utility": 0.5},
            }
        }

    runs = {
        "a": {0: report(0.10, 0.20), 1: report(0.30, 0.50), 2: report(0.20, 0.25)},
        "b": {0: report(0.5, 0.5), 1: report(0.5, 0.5)},
    }  # b stopped before its third seed
    for variant, seeds in runs.items():
        for seed, r in seeds.items():
            (tmp_path / "run" / variant / f"seed{seed}").mkdir(parents=True)
            (tmp_path / "run" / variant / f"seed{seed}" / "report.json").write_text(json.dumps(r))
    monkeypatch.setattr(seeds_table, "RESULTS", tmp_path / "results")
    seeds_table.main([str(tmp_path / "run"), "--name", "t"])
    out = capsys.readouterr().out
    # merged 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half-width t(0.975, 2) x 0.1 / sqrt(3) = 0.248; merged - unsplit
    # -0.10, -0.20, -0.05: mean -0.117, sd 0.0764, half-width 0.190, t -2.65, p 0.118 (not bold)
    assert "| a | forget_prob | 0.200 ± 0.248 | 0.317 ± " in out and "| -0.117 ± 0.190 | 0.12 |" in out
    assert "| a | model_utility | 0.500 ± 0.000 | 0.500 ± 0.000 | +0.000 ± 0.000 | - |" in out  # no spread, no test
    assert not any(line.startswith("| b |") for line in out.splitlines())
    saved = json.loads((tmp_path / "results" / "t.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and list(saved["summaries"]) == ["a"]
    assert saved["reference"] == {"base": {"forget_prob": 0.9, "model_utility": 0.5}}
