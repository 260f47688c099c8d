"""The shipped example configs stay valid against the config schema."""

from pathlib import Path

import pytest
import yaml

from orchestrator.config import PipelineConfig, apply_overrides

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_matches_the_schema(path):
    raw = yaml.safe_load(path.read_text())
    raw.pop("tune", None)  # checked by tests/test_tune.py
    variants = raw.pop("variants", {None: {}})
    for changes in variants.values():
        cfg = PipelineConfig.model_validate(apply_overrides(raw, changes))
        assert cfg.merge.method == "ties"


def test_yao_seven_covers_the_seven_methods():
    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "yao_seven.yaml").read_text())
    combos = {(v["unlearn.method"], v.get("unlearn.retain_source")) for v in raw["variants"].values()}
    assert combos == {("ga", None), ("random_label", None), ("adversarial", None), ("grad_diff", "retain"),
                      ("ga_kl", "retain"), ("grad_diff", "general"), ("ga_kl", "general")}


def test_demo_example_is_what_spunge_demo_runs(tmp_path):
    from orchestrator.demo import demo_config

    meta = {"template": "Question: {question}\nAnswer:", "split_attribute": "birth_decade"}
    root = Path(__file__).parent.parent
    made = demo_config(root / "spunge-demo" / "benchmark", meta, "small", root / "spunge-demo" / "run")
    shipped = yaml.safe_load((root / "examples" / "demo.yaml").read_text())
    assert shipped["unlearn"] == made["unlearn"] and shipped["merge"] == made["merge"]
    assert shipped["split"] == made["split"]
