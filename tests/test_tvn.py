"""Task-vector negation: the arithmetic, the job's outputs, and the two merge orders."""

import torch
from safetensors.torch import load_file

from jobs.merge import merge_models, rewrite_merged
from jobs.models import load_model, load_tokenizer, save_model
from jobs.spec import MergeSpec, UnlearnSpec
from jobs.unlearn.loop import run_unlearning
from jobs.unlearn.methods import build_method
from jobs.unlearn.methods.tvn import negate
from tests.test_loop import forget_nll


def test_negation_is_base_minus_lambda_task_vector():
    base, tuned = {"w": torch.tensor([1.0, 2.0, -1.0])}, {"w": torch.tensor([3.0, 2.0, 0.0])}
    assert torch.equal(negate(tuned, base, 0.5)["w"], torch.tensor([0.0, 2.0, -1.5]))  # 1-0.5*2, 2-0, -1-0.5*1


def test_tvn_job_fine_tunes_then_negates(tiny_dir, tmp_path, single_process_dist):
    s = UnlearnSpec(
        name="subset/old",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        method="tvn",
        method_params={"lam": 1.0},
        optimizer={"lr": 3e-3},
        max_steps=6,
        batch_size=4,
        output_dir=str(tmp_path / "out"),
    )
    run_unlearning(s)
    base = load_file(tiny_dir / "model" / "model.safetensors")
    trained, out = (
        load_file(tmp_path / "out" / "trained" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    for k in base:
        torch.testing.assert_close(out[k], 2 * base[k] - trained[k], atol=1e-6, rtol=0)
    b = forget_nll(tiny_dir / "model", tiny_dir)
    assert forget_nll(tmp_path / "out" / "trained", tiny_dir) < b < forget_nll(tmp_path / "out", tiny_dir)


def test_both_merge_orders_agree_under_ties(tiny_dir, tmp_path):
    tok, base_model = load_tokenizer(tiny_dir / "model"), load_model(tiny_dir / "model")
    base = base_model.state_dict()
    g = torch.Generator().manual_seed(3)
    trained, negated = {}, {}
    tvn = build_method("tvn", {"lam": 0.7})
    for name in ("a", "b"):
        sd = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        save_model(base_model, tok, tmp_path / name / "trained", state_dict=sd)
        save_model(base_model, tok, tmp_path / name, state_dict=tvn.finalize(sd, base))
        trained[name], negated[name] = str(tmp_path / name / "trained"), str(tmp_path / name)
    ties = {"density": 0.5, "normalize": True}
    merge_models(
        MergeSpec(
            base_model_path=str(tiny_dir / "model"),
            model_paths=trained,
            parameters=ties,
            output_dir=str(tmp_path / "m1"),
        ),
        post=lambda f: rewrite_merged(f, str(tiny_dir / "model"), tvn),
    )
    merge_models(
        MergeSpec(
            base_model_path=str(tiny_dir / "model"),
            model_paths=negated,
            parameters=ties,
            output_dir=str(tmp_path / "m2"),
        )
    )
    m1, m2 = load_file(tmp_path / "m1" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert any(not torch.equal(m1[k], base[k]) for k in base)
    for k in base:
        torch.testing.assert_close(m1[k], m2[k], atol=1e-5, rtol=1e-4)


def test_merge_input_and_rewrite_follow_the_order():
    first = build_method("tvn", {"order": "merge_then_negate"})
    assert first.merge_input() == "trained" and first.rewrites_merge()
    second = build_method("tvn", {"order": "negate_then_merge"})
    assert second.merge_input() is None and not second.rewrites_merge()
    assert build_method("npo").merge_input() is None and not build_method("npo").rewrites_merge()
