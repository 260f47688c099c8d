"""Models load from safetensors only; a pickle checkpoint is refused unless the config opts in."""

import pytest
import yaml

from jobs.models import ModelLoadError, load_model, load_tokenizer
from orchestrator.config.loading import load_config
from orchestrator.config.schema import ConfigError


@pytest.fixture(scope="module")
def pickle_model(tiny_dir, tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("pickle") / "model"
    model = load_model(tiny_dir / "model")
    model.config.save_pretrained(str(d))
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the legacy pickle format
    load_tokenizer(tiny_dir / "model").save_pretrained(str(d))
    assert (d / "pytorch_model.bin").exists() and not list(d.glob("*.safetensors"))
    return d


def test_pickle_checkpoint_is_refused_with_the_opt_in_named(pickle_model):
    with pytest.raises(ModelLoadError, match=r"only pickle checkpoints .*model.allow_pickle: true"):
        load_model(pickle_model)


def test_pickle_checkpoint_loads_when_allowed(pickle_model, tiny_dir):
    a, b = load_model(pickle_model, allow_pickle=True), load_model(tiny_dir / "model")
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_validate_rejects_a_pickle_model(pickle_model, tiny_dir, tmp_path):
    raw = {
        "model": {"path": str(pickle_model)},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl")},
        "split": {"attribute": "group"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert e.value.problems[0].startswith("model.path: ") and "allow_pickle" in e.value.problems[0]
    raw["model"]["allow_pickle"] = True
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "c.yaml").model.allow_pickle
