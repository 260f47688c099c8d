"""Who's Harry Potter: the generic-label formula by hand, the soft targets (the default: a KL to the generic
distribution) by hand and through the method, anchors (files, config paths, the demo benchmark's), the
reinforcement pre-job through the loop, and that a few steps lower forget answers more than retain."""

import json
import math

import pytest
import torch
from pydantic import ValidationError

from jobs.data.format import collate, encode_qa
from jobs.data.io import load_jsonl
from jobs.models import load_model, load_tokenizer
from jobs.spec import UnlearnSpec
from jobs.unlearn.loop import run_unlearning
from jobs.unlearn.methods import build_method
from jobs.unlearn.methods.base import mean_nll, sequence_logprob
from jobs.unlearn.methods.whp import generic_kl, generic_labels, generic_logits, translate
from jobs.unlearn.outputs import JOB_MARKER
from tests.conftest import qa_rows


def test_generic_logits_and_labels_match_hand_computed_values():
    base = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]]])
    reinf = torch.tensor([[[4.0, 1.0, -1.0], [0.0, 3.5, 1.0], [1.0, 2.0, 4.0]]])
    # v = base - 2 * relu(reinf - base): row 0 [2-4, 1, 0] = [-2, 1, 0]; row 1 [0, 3-1, 1] = [0, 2, 1];
    # row 2 [1, 1-2, 4] = [1, -1, 4]
    want = torch.tensor([[[-2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, -1.0, 4.0]]])
    assert torch.equal(generic_logits(base, reinf, 2.0), want)
    # argmaxes per position: 1, 1, 2. Logits at t label token t+1; position 0 and prompt positions keep -100
    labels = torch.tensor([[-100, 7, 8]])
    assert generic_labels(base, reinf, labels, 2.0).tolist() == [[-100, 1, 1]]
    assert generic_labels(base, reinf, torch.tensor([[-100, -100, 8]]), 2.0).tolist() == [[-100, -100, 1]]
    # beta 0: the base model's own argmax (0 at position 0: where the reinforced model boosted token 0)
    assert generic_labels(base, reinf, labels, 0.0).tolist() == [[-100, 0, 1]]


@pytest.fixture(scope="module")
def data(tiny_dir):
    """(tiny model dir, its forget/retain batch)."""
    tok = load_tokenizer(tiny_dir / "model")
    rows = qa_rows()
    enc = lambda rs: collate([encode_qa(tok, r["question"], r["answer"]) for r in rs], tok.pad_token_id)
    return tiny_dir / "model", {
        "forget": enc([r for r in rows if r["era"] == "old"]),
        "retain": enc([r for r in rows if r["era"] == "new"]),
    }


# ---------------------------------------------------------------- soft targets (the default)


def test_soft_target_loss_is_the_kl_to_the_generic_distribution_by_hand():
    base = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]]])
    reinf = torch.tensor([[[4.0, 1.0, -1.0], [0.0, 3.5, 1.0], [1.0, 2.0, 4.0]]])
    model = torch.tensor([[[0.5, 0.0, 1.0], [1.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 7, 8]])  # positions 0 and 1 predict the two targets; position 2 predicts none

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kls = []
    for t in (0, 1):
        g = [b - 2.0 * max(0.0, r - b) for b, r in zip(base[0, t].tolist(), reinf[0, t].tolist())]
        q, p = softmax(g), softmax(model[0, t].tolist())
        kls.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p)))
    assert generic_kl(model, base, reinf, labels, 2.0).item() == pytest.approx(sum(kls) / 2, rel=1e-6)
    # only target positions count; no target: 0
    one = torch.tensor([[-100, -100, 8]])
    assert generic_kl(model, base, reinf, one, 2.0).item() == pytest.approx(kls[1], rel=1e-6)
    assert generic_kl(model, base, reinf, torch.full((1, 3), -100), 2.0).item() == 0.0
    # the model at the generic distribution: KL 0
    g = base - 2.0 * torch.relu(reinf - base)
    assert generic_kl(g, base, reinf, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_whp_defaults_and_the_soft_loss_through_the_method(data):
    p = build_method("whp").params
    assert (p.targets, p.beta, p.alpha) == ("soft", 5.0, 0.0)
    path, batch = data
    model, base = load_model(path), load_model(path).eval()
    torch.manual_seed(1)
    reinforced = load_model(path).eval()
    with torch.no_grad():
        for w in reinforced.parameters():
            w.add_(0.05 * torch.randn_like(w))
    whp_batch = {"forget": batch["forget"], "generic": batch["forget"]}
    for targets in ("soft", "hard"):
        method = build_method("whp", {"reinforced": "given", "targets": targets, "beta": 5.0})
        method.reinforced_model = reinforced
        out = method.loss(model, whp_batch, base)
        ids = {k: batch["forget"][k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            zb, zr, zm = base(**ids).logits, reinforced(**ids).logits, model(**ids).logits
        if targets == "soft":
            want = generic_kl(zm, zb, zr, batch["forget"]["labels"], 5.0)
        else:
            from jobs.unlearn.methods.base import token_mean_nll

            want = token_mean_nll(zm, generic_labels(zb, zr, batch["forget"]["labels"], 5.0))
        assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert out.metrics["generic_loss"] == pytest.approx(want.item(), rel=1e-5) and out.loss.requires_grad


def test_translate_swaps_whole_terms_longest_first():
    anchors = {"Velmor": "John", "Velmor Quin": "John Smith", "The Ashen Crown": "The Old House"}
    assert translate("Velmor Quin wrote The Ashen Crown.", anchors) == "John Smith wrote The Old House."
    assert translate("Velmor and Velmorson", anchors) == "John and Velmorson"  # whole words only
    assert translate("unchanged", {}) == "unchanged"


def test_anchor_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValidationError, match=r"anchors[\s\S]*no such file .*missing\.json"):
        build_method("whp", {"anchors": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValidationError, match=r"bad\.json is not valid JSON"):
        build_method("whp", {"anchors": str(bad)})
    bad.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValidationError, match=r"bad\.json must hold a JSON object"):
        build_method("whp", {"anchors": str(bad)})


def test_config_resolves_anchors_against_its_folder_and_reports_a_missing_file(tmp_path, tiny_dir):
    from orchestrator.config.parse import parse_config
    from orchestrator.config.schema import ConfigError

    (tmp_path / "anchors.json").write_text(json.dumps({"Oslo": "Springfield"}))
    raw = {
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl")},
        "split": {"attribute": "group"},
        "unlearn": {"method": "whp", "params": {"anchors": "anchors.json"}},
    }
    cfg = parse_config(raw, tmp_path)
    assert cfg.unlearn.params["anchors"] == str((tmp_path / "anchors.json").resolve())
    raw["unlearn"]["params"]["anchors"] = "nope.json"
    with pytest.raises(ConfigError) as e:
        parse_config(raw, tmp_path)
    assert any(p.startswith("unlearn.params.anchors:") and "no such file nope.json" in p for p in e.value.problems)


def test_demo_benchmark_anchors_cover_its_forget_entities():
    from jobs.data.demo import anchor_terms, generate

    data = generate("tiny", 0)
    anchors = anchor_terms(data, 0)
    assert anchors == anchor_terms(generate("tiny", 0), 0)  # deterministic
    for r in data["forget"]:
        assert r["author"] in anchors
        if r["fact"] in ("birthplace", "first_book", "award"):
            assert r["value"] in anchors and anchors[r["value"]] not in r["answer"]
            assert translate(r["answer"], anchors) == r["answer"].replace(r["value"], anchors[r["value"]])
    assert not any(r["author"] in anchors for r in data["retain"])


def test_pre_jobs_ask_for_a_reinforcement_job_unless_one_is_given(tmp_path):
    spec = UnlearnSpec(
        name="subset/1950s",
        model_path="m",
        forget_path="f",
        retain_path="r",
        method="whp",
        method_params={"beta": 2.0, "reinforce_steps": 7, "reinforce_lr": 1e-3},
        max_steps=50,
        optimizer={"lr": 3e-4},
        output_dir=str(tmp_path / "job"),
    )
    [(suffix, pre, update)] = build_method("whp", spec.method_params).pre_jobs(spec)
    assert suffix == "reinforced" and update == {"reinforced": str(tmp_path / "job" / "reinforced")}
    assert pre.output_dir == update["reinforced"] and pre.name == "subset/1950s/reinforced"
    assert pre.method == "whp" and pre.method_params == {**spec.method_params, "phase": "reinforce"}
    assert pre.max_steps == 7 and pre.optimizer.lr == 1e-3 and pre.retain_path is None
    reinforce = build_method("whp", pre.method_params)
    assert reinforce.pre_jobs(pre) == [] and not reinforce.needs_reference and not reinforce.uses_retain()
    assert build_method("whp", {"reinforced": "/x"}).pre_jobs(spec) == []
    assert build_method("npo").pre_jobs(spec) == []


def test_reinforce_then_whp_jobs_run_through_the_loop(tiny_dir, tmp_path, single_process_dist):
    (tmp_path / "anchors.json").write_text(json.dumps({"Oslo": "Lima", "Rome": "Riga"}))
    spec = UnlearnSpec(
        name="unsplit",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method="whp",
        method_params={"anchors": str(tmp_path / "anchors.json"), "reinforce_steps": 4, "alpha": 0.5},
        optimizer={"lr": 3e-3},
        max_steps=3,
        batch_size=4,
        report_interval_s=0,
        output_dir=str(tmp_path / "out"),
    )
    [(_, pre, update)] = build_method(spec.method, spec.method_params).pre_jobs(spec)
    run_unlearning(pre)
    reinforced = json.loads((tmp_path / "out" / "reinforced" / JOB_MARKER).read_text())
    assert reinforced["final_metrics"]["step"] == 4 and "generic_loss" not in reinforced["final_metrics"]
    rows = []
    main = spec.model_copy(update={"method_params": {**spec.method_params, **update}})
    final = run_unlearning(main, report=lambda r, **kw: rows.extend(r))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"generic_loss", "forget_loss", "retain_loss"} <= set(final)
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / JOB_MARKER).exists()


def _answer_prob(model, part) -> float:
    """Mean over rows of the per-token answer probability exp(log p / n)."""
    with torch.no_grad():
        logp, n = sequence_logprob(model, part)
    return torch.exp(logp / n).mean().item()


def _descend(model, loss_fn, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_a_few_whp_steps_lower_forget_answers_more_than_retain(tiny_dir):
    """The three steps in plain torch on a tiny model that first memorises the 16 QA rows (the benchmark's
    base model in miniature: the tiny offline benchmark takes minutes to build)."""
    tok = load_tokenizer(tiny_dir / "model")
    forget, retain = load_jsonl(tiny_dir / "forget.jsonl"), load_jsonl(tiny_dir / "retain.jsonl")
    anchors = {
        "Ana Lind": "John Smith",
        "Bo Chen": "Mary Brown",
        "Cai Moro": "Paul Young",
        "Dee Park": "Anna King",
        "Oslo": "Paris",
        "Lima": "Paris",
        "Rome": "London",
        "Kyiv": "London",
    }
    enc = lambda pairs: collate([encode_qa(tok, q, a) for q, a in pairs], tok.pad_token_id)
    batch = {
        "forget": enc([(r["question"], r["answer"]) for r in forget]),
        "generic": enc([(r["question"], translate(r["answer"], anchors)) for r in forget]),
    }
    assert not torch.equal(batch["forget"]["input_ids"], batch["generic"]["input_ids"])
    retain_batch = enc([(r["question"], r["answer"]) for r in retain])
    both = enc([(r["question"], r["answer"]) for r in forget + retain])

    torch.manual_seed(0)
    base = load_model(tiny_dir / "model")
    _descend(base, lambda: mean_nll(base, both), 60, 1e-2)  # memorise forget and retain
    state = {k: v.clone() for k, v in base.state_dict().items()}
    assert _answer_prob(base, batch["forget"]) > 0.5

    reinforced = load_model(tiny_dir / "model")  # step 1: more NLL descent on the forget answers
    reinforced.load_state_dict(state)
    _descend(reinforced, lambda: mean_nll(reinforced, batch["forget"]), 10, 3e-3)
    method = build_method("whp", {"reinforced": "set-below", "beta": 1.0})
    method.reinforced_model = reinforced.eval()

    model, ref = load_model(tiny_dir / "model"), base.eval()  # steps 2-3: fine-tune the base on generic labels
    model.load_state_dict(state)
    f0, r0 = _answer_prob(model, batch["forget"]), _answer_prob(model, retain_batch)
    _descend(model, lambda: method.loss(model, batch, ref).loss, 10, 3e-3)
    f1, r1 = _answer_prob(model, batch["forget"]), _answer_prob(model, retain_batch)
    assert f1 < f0 - 0.1, (f0, f1)
    assert (r0 - r1) < (f0 - f1), (r0, r1, f0, f1)
