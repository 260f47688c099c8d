"""IdkDPO (Maini et al. 2024, TOFU; Rafailov et al. 2023, DPO): prefer a refusal over the forget answer.

Each forget row gets an "idk" view: its question with a refusal drawn from ``idk_answers`` (TOFU's
data/idontknow.jsonl plays this part there). With w = the refusal and l = the forget answer,

r_w    = log pi(w|x) - log pi_ref(w|x),   r_l = log pi(l|x) - log pi_ref(l|x)   (summed over answer tokens)
loss   = -(2 / beta) * mean(logsigmoid(beta * (r_w - r_l))) * gamma + alpha * NLL(retain)

as open-unlearning's DPO trainer (src/trainer/unlearn/dpo.py, ``compute_dpo_loss`` in src/trainer/utils.py;
configs/trainer/DPO.yaml: beta 0.1, gamma 1, alpha 1, retain NLL) with its TOFU ``idk`` experiment. At the
start (pi = pi_ref) the forget term is (2/beta) ln 2. The loop encodes the views once per job (its rng is
``random.Random(unlearn.seed)``), so a row keeps its refusal across epochs; open-unlearning's idk dataset draws
a new one each time it reads the row.

Defaults: ``beta`` 0.05 (open-unlearning's 0.1 before issue 15), ``gamma`` 1, ``alpha`` 1. Why not 0.1: the
forget term stops pulling once beta * (r_w - r_l) is a few units (the sigmoid saturates), i.e. once the summed
log-ratio margin reaches ~5 / beta nats, and nothing says which side supplies it. A model that has never
produced a refusal (the demo benchmark's) supplies about the margin beta 0.1 needs by raising the refusal alone,
so the term saturates early with the forget answers barely touched; halving beta doubles the margin needed, more
than the refusal side can supply, so the answers must fall (docs/benchmarks.md "Method defaults on the demo
benchmark" has the runs). How far the answers go thus depends on how improbable the refusals start: on a model
that already finds refusals likely (a chat model, TOFU's setting) the refusal side supplies less and the answers
more at any beta, so there open-unlearning's 0.1 may be enough and 0.05 pushes the answers harder.
"""

import random

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, sequence_logprob, token_mean, with_retain

IDK_ANSWERS = [
    "I don't know.",
    "I'm not sure about that.",
    "I have no information about that.",
    "I'm afraid I can't answer that.",
    "That is beyond what I know.",
    "I don't have that information.",
    "I'm not certain, sorry.",
    "I can't say.",
]


class IdkDPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(
        0.05,
        gt=0,
        description="inverse temperature of the preference loss (open-unlearning: 0.1; "
        "lower: the forget answers must supply more of the margin)",
    )
    gamma: float = Field(1.0, ge=0, description="weight of the forget (DPO) term")
    alpha: float = Field(1.0, ge=0, description="weight of the retain NLL term (0 turns it off)")
    idk_answers: list[str] = Field(
        default_factory=lambda: list(IDK_ANSWERS),
        min_length=1,
        description="refusals; each forget row is paired with one drawn at random",
    )


def dpo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta: float) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))).mean()


@register("idk_dpo")
class IdkDPO(Method):
    Params = IdkDPOParams
    needs_reference = True
    needs_retain = True

    takes_text = False  # its views rewrite the answers of question/answer rows

    def forget_views(self, row: dict, rng: random.Random) -> dict[str, tuple[str, str]]:
        return {"idk": (row["question"], rng.choice(self.params.idk_answers))}

    def loss(self, model, batch, ref_model=None):
        if batch.get("idk") is None:
            raise KeyError("idk_dpo needs batch['idk'] (the refusal view from forget_views)")
        logp_w, n_w = sequence_logprob(model, batch["idk"])
        logp_l, n_l = sequence_logprob(model, batch["forget"])
        with torch.no_grad():
            ref_w, _ = sequence_logprob(ref_model, batch["idk"])
            ref_l, _ = sequence_logprob(ref_model, batch["forget"])
        forget = dpo_loss(logp_w, ref_w, logp_l, ref_l, self.params.beta)
        metrics = {
            "forget_loss": token_mean(-logp_l.sum(), n_l, batch["forget"]).detach(),
            "idk_loss": token_mean(-logp_w.sum(), n_w, batch["idk"]).detach(),
            "dpo_loss": forget.detach(),
        }
        loss = self.params.gamma * forget
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
