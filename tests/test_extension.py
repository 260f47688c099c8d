"""Adding a method or an evaluation suite is one file (docs/architecture.md): a new file in the package's folder
is picked up by the registry, and the config, the training loop, the checks, the report and the reference
metrics use it with no other change.

Each test runs a fresh interpreter whose package path also holds a temporary folder with the one new file, as
if it had been dropped into jobs/unlearn/methods/ or jobs/evaluate/ (the source tree is not written to)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

NEW_METHOD = '''
"""Toy ascent: ``loss = -scale * NLL(forget)`` (gradient ascent scaled)."""

from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(0.5, gt=0)


@register("toy_ascent")
class ToyAscent(Method):
    Params = Params

    def loss(self, model, batch, ref_model=None):
        nll = mean_nll(model, batch["forget"])
        return LossOutput(-self.params.scale * nll, {"forget_loss": float(nll.item())})
'''

NEW_SUITE = '''
"""Mean answer length of the forget rows, in characters or tokens; its difference to the oracle's."""

from pydantic import BaseModel, ConfigDict

from jobs.evaluate.suites import Reference, register_suite


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit: str = "chars"


def vs_oracle(result, oracle):
    mine, ref = result["metrics"].get("answer_length"), oracle["metrics"].get("answer_length")
    return None if mine is None or ref is None else mine - ref


@register_suite("answer_length", needs=("holdout",), options=Options, groups=(("Length", r"^answer_length"),),
                references=(Reference("answer_length_vs_oracle", vs_oracle),))
def answer_length(ctx, data, opts):
    rows = data["forget"]
    sizes = [len(r["answer"]) if opts.unit == "chars" else len(ctx.tokenizer(r["answer"])["input_ids"]) for r in rows]
    return {"metrics": {"answer_length": sum(sizes) / len(sizes)}, "raw": {}}
'''


def run_with(package: str, filename: str, source: str, script: str, tmp_path: Path) -> dict:
    """Run ``script`` in a fresh interpreter with ``source`` as ``<package>/<filename>``; its last stdout
    line is JSON."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / filename).write_text(source)
    code = (
        f"import importlib\nimportlib.import_module({package!r}).__path__.append({str(extra)!r})\n"
        + textwrap.dedent(script)
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def config(tiny_dir: Path, tmp_path: Path, data: dict | None = None, **sections) -> str:
    raw = {
        "model": {"path": str(tiny_dir / "model")},
        "data": {"forget": str(tiny_dir / "forget.jsonl"), "retain": str(tiny_dir / "retain.jsonl"), **(data or {})},
        "split": {"attribute": "group"},
        **sections,
    }
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_new_method_is_one_file(tiny_dir, tmp_path):
    good = config(tiny_dir, tmp_path, unlearn={"method": "toy_ascent", "params": {"scale": 2.0}})
    bad = config(tiny_dir, tmp_path, unlearn={"method": "toy_ascent", "params": {"scale": -1}})
    out = run_with(
        "jobs.unlearn.methods",
        "toy_ascent.py",
        NEW_METHOD,
        f"""
        import json, os, socket
        from jobs.unlearn.methods import method_names
        from orchestrator.config.schema import ConfigError
        from orchestrator.config.loading import load_config

        cfg = load_config({good!r})
        try:
            load_config({bad!r})
            bad = None
        except ConfigError as e:
            bad = e.problems
        # the real DeepSpeed loop, this process as rank 0 of 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from jobs.spec import UnlearnSpec
        from jobs.unlearn.loop import run_unlearning
        spec = UnlearnSpec(name="subset/old", model_path={str(tiny_dir / "model")!r},
                           forget_path={str(tiny_dir / "forget.jsonl")!r},
                           method=cfg.unlearn.method, method_params=cfg.unlearn.params, optimizer={{"lr": 3e-3}},
                           max_steps=4, batch_size=4, report_interval_s=0, output_dir={str(tmp_path / "job")!r})
        rows = []
        run_unlearning(spec, report=rows.extend)
        print(json.dumps({{"names": method_names(), "bad": bad, "rows": rows}}))
    """,
        tmp_path,
    )
    assert "toy_ascent" in out["names"]
    assert out["bad"] and out["bad"][0].startswith("unlearn.params.scale: Input should be greater than 0")
    rows = out["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == -2.0 * rows[0]["forget_loss"]  # the file's formula, through the loop
    assert rows[-1]["forget_loss"] > rows[0]["forget_loss"]  # ascent: the forget NLL rises
    assert (tmp_path / "job" / "model.safetensors").exists()


def test_a_new_suite_is_one_file(tiny_dir, tmp_path):
    holdout = {"holdout": str(tiny_dir / "retain.jsonl")}
    good = config(
        tiny_dir, tmp_path, data=holdout, eval={"suites": ["answer_length"], "answer_length": {"unit": "tokens"}}
    )
    no_holdout = config(tiny_dir, tmp_path, eval={"suites": ["answer_length"]})
    bad_option = config(
        tiny_dir, tmp_path, data=holdout, eval={"suites": ["answer_length"], "answer_length": {"units": "tokens"}}
    )
    out = run_with(
        "jobs.evaluate",
        "answer_length.py",
        NEW_SUITE,
        f"""
        import json
        from jobs.evaluate.suites import add_reference_metrics, evaluate_model
        from orchestrator.config.schema import ConfigError
        from orchestrator.config.loading import load_config
        from orchestrator.stages.report import group_columns, metric_group

        def problems(path):
            try:
                load_config(path)
            except ConfigError as e:
                return e.problems

        cfg = load_config({good!r})
        res = evaluate_model(cfg.model.path, {{"forget": cfg.data.forget.path}}, suites=cfg.eval.suites,
                             suite_options={{"answer_length": cfg.eval.suite_options("answer_length")}})
        results = {{"oracle": {{"metrics": {{"answer_length": 2.0}}}}, "base": {{"metrics": dict(res["metrics"])}}}}
        add_reference_metrics(results)
        print(json.dumps({{"options": cfg.eval.suite_options("answer_length"), "metrics": res["metrics"],
                          "base": results["base"]["metrics"], "no_holdout": problems({no_holdout!r}),
                          "bad_option": problems({bad_option!r}), "group": metric_group("answer_length"),
                          "columns": group_columns(["answer_length", "forget_prob", "weird"])}}))
    """,
        tmp_path,
    )
    from jobs.data.io import load_jsonl
    from jobs.models import load_tokenizer

    tok = load_tokenizer(tiny_dir / "model")
    answers = [r["answer"] for r in load_jsonl(tiny_dir / "forget.jsonl")]
    want = sum(len(tok(a)["input_ids"]) for a in answers) / len(answers)
    assert out["options"] == {"unit": "tokens"}  # eval.answer_length is the suite's options model
    assert out["metrics"] == {"answer_length": want}
    assert out["base"]["answer_length_vs_oracle"] == want - 2.0  # its reference metric, against the oracle
    assert out["no_holdout"] == [
        "data.holdout: the answer_length suite needs held-out question/answer rows "
        "never trained on (the non-members of membership inference), but it is not set"
    ]
    assert out["bad_option"][0].startswith("eval.answer_length.units: Extra inputs are not permitted")
    assert out["group"] == "Length"
    assert list(out["columns"]) == ["Forget", "Length", "Other"]  # its own group, before Other
