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
    from orchestrator.loading import load_tune

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
