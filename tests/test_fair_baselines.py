"""benchmarks/fair_baselines.py: a search space for every registered method, and tune recipes spunge accepts."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("fair_baselines", ROOT / "benchmarks" / "fair_baselines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_method_has_a_space_and_each_recipe_validates(tiny_bench, tmp_path):
    from jobs.unlearn.methods import build_method, method_names
    from orchestrator.config.loading import load_tune

    fair = load_script()
    assert set(method_names()) <= set(fair.COEFFICIENTS)
    bench = tiny_bench[0]
    for method, (coef, _) in fair.COEFFICIENTS.items():
        if coef:  # the coefficient is a parameter of the method
            assert coef in type(build_method(method, {}).params).model_fields, method
        for model in ("merged", "unsplit"):
            cfg = fair.tune_config(bench, method, model, tmp_path / method / model, samples=2, steps=10)
            path = tmp_path / f"{method}-{model}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            job = load_tune(path)
            assert job.tune.objective.model == model
            assert job.cfg.split.baseline == ("unsplit" if model == "unsplit" else "none")
            if method == "whp":  # the benchmark's anchor file
                assert job.cfg.unlearn.params["anchors"] == str(bench / "data" / "anchors.json")


def test_the_docs_table_shows_mean_half_width_paired_difference_and_p():
    from orchestrator.experiments.seeds import paired_test

    fair = load_script()
    merged = {m: [1.0, 2.0, 3.0] for m in fair.METRICS}
    unsplit = {m: [0.0, 0.0, 0.0] for m in fair.METRICS}
    unsplit["model_utility"] = [2.83729618060969e-06] * 3  # whp's equal values, whose float sum / 3 is 1 ulp off
    results = {
        "methods": {
            "npo": {
                "merged": {"tuned": {"lr": 2.5e-4, "beta": 0.1}, "values": merged},
                "unsplit": {"tuned": {"lr": 1e-4, "beta": 0.5}, "values": unsplit},
                "paired": {m: paired_test(merged[m], unsplit[m]) for m in fair.METRICS},
            }
        }
    }
    rows = fair.markdown_table(results).splitlines()
    assert len(rows) == 2 + len(fair.METRICS)
    # mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 2.484; the differences are the merged values: t = 2
    # sqrt(3) = 3.46 with 2 degrees of freedom, two-sided p 0.0742 (not bold: >= 0.05)
    assert rows[2] == (
        "| npo | lr 2.50e-04, beta 0.1 | lr 1.00e-04, beta 0.5 | forget_quality | 2 ± 2.48 | 0 ± 0 | "
        "+2 ± 2.48 | 0.074 |"
    )
    assert rows[3].startswith("|  |  |  | forget_prob | 2 ± 2.48 |")
    assert rows[4].startswith("|  |  |  | model_utility | 2 ± 2.48 | 2.84e-06 ± 0 |")  # not "± 1.29e-21"
