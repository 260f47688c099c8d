"""Who's Harry Potter (Eldan and Russinovich 2023, "Who's Harry Potter? Approximate Unlearning in LLMs").

Three steps, the first a training job of its own:

1. reinforce: fine-tune a copy of the base model further on the forget data (NLL descent; the runner runs
   it before the unlearning job through ``Method.pre_jobs``, output in ``<job>/reinforced``);
2. generic predictions: translate each forget answer with the anchor dictionary (idiosyncratic term ->
   generic term, e.g. an author's name -> a common name), run the frozen base and the frozen reinforced
   model on question + translated answer, and take at every answer token the generic logits

       v_generic = v_base - beta * ReLU(v_reinforced - v_base)        (v: logits)

   i.e. the base model's prediction with the tokens the reinforced model boosted pushed down;
3. fine-tune the base towards them, with ``targets``:
   - ``hard``: labels g_t = argmax v_generic,t (the paper's "generic labels"):
     loss = NLL(g | question + translated answer) + alpha * NLL(retain);
   - ``soft`` (the default): the whole generic distribution, softmax(v_generic):
     loss = mean over answer positions t of KL(softmax(v_generic,t) || pi_t) + alpha * NLL(retain)
     (pi_t the model's next-token distribution at t; the KL has the gradient of the cross-entropy to the
     soft target, as in distillation).

The paper calls the coefficient alpha (v_generic := v_baseline - alpha * ReLU(v_reinforced -
v_baseline), the ReLU so that only logits the reinforcement raised are pushed down); here ``alpha`` is the
retain weight as in every other method and the WHP coefficient is ``beta``. Its default is 5.0, the value
issue 15 cites for the paper's alpha (not re-checked against the paper's text here: no copy was at hand). It
was 1.0 before issue 15. The paper trains on the hard labels.

Why soft targets by default: on a model that has memorised its answers (the demo benchmark) reinforcement
barely raises the memorised token's logit, so the base model's margin mostly survives the subtraction; the
argmax, and with it the hard label, stays the memorised token, and the hard fine-tune re-teaches much of the
answer. The soft target still lowers that token's probability by whatever the boost takes off, and the tokens
the reinforced model did not boost keep the base model's relative probabilities (a distillation target). On
the demo benchmark soft targets at beta 5 forget more than the old hard labels at beta 1 at about the same
retain, hard labels at beta 5 forget more but cost more retain, and beta 20 wrecks retain (docs/benchmarks.md
"Method defaults on the demo benchmark" has the runs). ``alpha`` stays 0 by default
because the paper has no retain term and WHP then needs no retain data.

The paper also aligns the translated text with the original token by token; with QA rows the question is
kept and only the answer is translated, so the positions of the generic targets are those of the translated
answer. ``reinforced`` names an existing reinforced model folder and skips step 1.

Metrics: ``forget_loss`` (NLL of the original forget answers) and ``generic_loss`` (the fine-tune term: the
NLL of the hard labels, or the KL to the soft targets).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.data.format import IGNORE_INDEX
from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll, token_mean_nll, with_retain


def load_anchors(path: str) -> dict[str, str]:
    """The anchor dictionary: a JSON object ``{"idiosyncratic term": "generic term", ...}``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such file {path} (expected a JSON object of term -> generic term)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path} must hold a JSON object mapping non-empty strings to strings")
    return data


def translate(text: str, anchors: dict[str, str]) -> str:
    """Replace every anchored term (whole words, longest first) by its generic term."""
    if not anchors:
        return text
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(k) for k in sorted(anchors, key=len, reverse=True)) + r")(?!\w)"
    )
    return pattern.sub(lambda m: anchors[m.group(1)], text)


def generic_logits(base: torch.Tensor, reinforced: torch.Tensor, beta: float) -> torch.Tensor:
    """v_generic = v_base - beta * ReLU(v_reinforced - v_base)."""
    base, reinforced = base.float(), reinforced.float()
    return base - beta * torch.relu(reinforced - base)


def generic_kl(
    logits: torch.Tensor, base: torch.Tensor, reinforced: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean over target positions of KL(softmax(v_generic) || softmax(logits)) (float32, 0-d; 0 with a graph
    when there is no target). As in ``generic_labels``, the logits at position t predict token t+1, so the
    positions that count are those t whose label at t+1 is a target."""
    pos = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    if not pos.any():
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits[:, :-1][pos].float(), dim=-1)  # [N, V]
    logq = torch.log_softmax(generic_logits(base[:, :-1][pos], reinforced[:, :-1][pos], beta), dim=-1)
    return (logq.exp() * (logq - logp)).sum(dim=-1).mean()


def generic_labels(base: torch.Tensor, reinforced: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Labels (unshifted, like ``labels``) whose target tokens are the argmax of the generic logits.

    Logits at position t predict token t+1, so the label at t+1 is the generic argmax at t; positions
    without a target (-100) keep none."""
    pred = generic_logits(base, reinforced, beta).argmax(-1)
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, pred[:, :-1], out[:, 1:])
    return out


class WHPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(
        5.0, ge=0, description="WHP coefficient on ReLU(v_reinforced - v_base) (the paper's alpha, 5 there)"
    )
    targets: Literal["hard", "soft"] = Field(
        "soft",
        description="soft: KL to softmax(v_generic) at every answer token; hard: NLL of argmax v_generic "
        "(the paper's generic labels)",
    )
    alpha: float = Field(0.0, ge=0, description="weight of the retain NLL term (0 turns it off)")
    anchors: Optional[str] = Field(
        None,
        description="JSON file {idiosyncratic term: generic term}; relative to the config file; None: no translation",
    )
    reinforce_epochs: float = Field(3.0, gt=0, description="epochs of the reinforcement job on the forget set")
    reinforce_steps: Optional[int] = Field(None, gt=0, description="steps of the reinforcement job (overrides epochs)")
    reinforce_lr: Optional[float] = Field(None, gt=0, description="lr of the reinforcement job (default: the job's)")
    reinforced: Optional[str] = Field(
        None,
        description="an existing reinforced model folder (skips step 1); set by the runner after the reinforcement job",
    )
    phase: Literal["unlearn", "reinforce"] = Field("unlearn", description="internal: which step this job runs")

    @field_validator("anchors")
    @classmethod
    def _anchors(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            load_anchors(v)
        return v


@register("whp")
class WhosHarryPotter(Method):
    Params = WHPParams
    needs_reference = True
    takes_text = False  # its views rewrite the answers of question/answer rows
    path_params: ClassVar[tuple[str, ...]] = ("anchors", "reinforced")

    def __init__(self, params: WHPParams):
        super().__init__(params)
        self.reinforcing = params.phase == "reinforce"
        self.needs_reference = not self.reinforcing
        self.anchors = load_anchors(params.anchors) if params.anchors else {}
        self.reinforced_model: Optional[Any] = None

    def uses_retain(self) -> bool:
        return not self.reinforcing and super().uses_retain()

    def pre_jobs(self, spec: Any) -> list[tuple[str, Any, dict]]:
        p = self.params
        if self.reinforcing or p.reinforced is not None:
            return []
        out = str(Path(spec.output_dir) / "reinforced")
        update: dict[str, Any] = {
            "name": f"{spec.name}/reinforced",
            "output_dir": out,
            "retain_path": None,
            "localize": None,
            "method_params": {**spec.method_params, "phase": "reinforce"},
            "epochs": p.reinforce_epochs,
            "max_steps": p.reinforce_steps,
        }
        if p.reinforce_lr is not None:
            update["optimizer"] = spec.optimizer.model_copy(update={"lr": p.reinforce_lr})
        return [("reinforced", spec.model_copy(update=update), {"reinforced": out})]

    def forget_views(self, row: dict, rng: random.Random) -> dict[str, tuple[str, str]]:
        if self.reinforcing:
            return {}
        return {"generic": (row["question"], translate(row["answer"], self.anchors))}

    def setup(self, model: Any) -> None:
        if not self.reinforcing and self.params.reinforced is None:
            raise ValueError("whp: params.reinforced is not set (the runner sets it after the reinforcement job)")

    def frozen_models(self) -> dict[str, str]:
        return {} if self.reinforcing else {"reinforced_model": self.params.reinforced}

    def loss(self, model, batch, ref_model=None):
        if self.reinforcing:
            forget = mean_nll(model, batch["forget"])
            return LossOutput(forget, {"forget_loss": forget.detach()})
        if batch.get("generic") is None:
            raise KeyError("whp needs batch['generic'] (the anchor-translated view from forget_views)")
        part = batch["generic"]
        ids, mask = part["input_ids"], part["attention_mask"]
        reinforced = self.reinforced_model
        p = self.params
        with torch.no_grad():
            base_logits = ref_model(input_ids=ids, attention_mask=mask).logits
            reinf_logits = reinforced(input_ids=ids, attention_mask=mask).logits
        logits = model(input_ids=ids, attention_mask=mask).logits
        if p.targets == "soft":
            loss = generic_kl(logits, base_logits, reinf_logits, part["labels"], p.beta)
        else:
            loss = token_mean_nll(logits, generic_labels(base_logits, reinf_logits, part["labels"], p.beta), part)
        del base_logits, reinf_logits
        with torch.no_grad():
            forget = mean_nll(model, batch["forget"])
        metrics = {"forget_loss": forget, "generic_loss": loss.detach()}
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
