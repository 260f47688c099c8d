"""SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning"): NPO without a reference model, on the length-normalised log-probability, plus retain NLL.

lp_bar = log pi(y|x) / |y|                                     (mean log-prob of the answer tokens)
loss   = -(2 / beta) * mean(logsigmoid(beta * (-lp_bar - delta))) * gamma + alpha * NLL(retain)

As in the authors' code (OPTML-Group/Unlearn-Simple, TOFU/dataloader.py, loss "simnpo_grad_diff") and
open-unlearning (src/trainer/unlearn/simnpo.py), the margin delta sits inside the beta scaling:
beta * (NLL/|y| - delta). The paper writes the margin outside, -(beta/|y|) log pi - delta; the two agree at the
default delta = 0 (for another delta, this delta equals the paper's divided by beta).
Defaults: beta 2.5 (the paper's TOFU forget05 setting; open-unlearning's configs/trainer/SimNPO.yaml uses
beta 4.5, gamma 0.125, alpha 1), delta 0, gamma 1, alpha 1.
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, sequence_logprob, token_mean, with_retain


class SimNPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(2.5, gt=0, description="inverse temperature of the preference loss")
    delta: float = Field(0.0, description="reward margin (open-unlearning's delta, the paper's gamma / beta)")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (SimNPO) term")
    alpha: float = Field(1.0, ge=0, description="weight of the retain NLL term (0 turns it off)")


def simnpo_loss(logp: torch.Tensor, n: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """``logp``: summed log-prob of each answer, ``n``: its token count."""
    mean_nll_per_seq = -logp / n.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll_per_seq - delta)).mean()


@register("simnpo")
class SimNPO(Method):
    Params = SimNPOParams
    needs_retain = True

    def loss(self, model, batch, ref_model=None):
        logp, n = sequence_logprob(model, batch["forget"])
        forget = simnpo_loss(logp, n, self.params.beta, self.params.delta)
        metrics = {"forget_loss": token_mean(-logp.sum(), n, batch["forget"]).detach(), "simnpo_loss": forget.detach()}
        loss = self.params.gamma * forget
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
