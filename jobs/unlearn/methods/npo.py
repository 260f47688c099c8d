"""Negative Preference Optimization (Zhang et al. 2024), with a retain NLL term as in open-unlearning.

log_ratio = log pi(y|x) - log pi_ref(y|x)                   (summed over answer tokens)
loss      = -(2 / beta) * mean(logsigmoid(-beta * log_ratio)) * gamma + alpha * NLL(retain)
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, sequence_logprob, token_mean, with_retain


class NPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="inverse temperature of the preference loss")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (NPO) term")
    alpha: float = Field(1.0, ge=0, description="weight of the retain NLL term (0 turns it off)")


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


@register("npo")
class NPO(Method):
    Params = NPOParams
    needs_reference = True
    needs_retain = True

    def loss(self, model, batch, ref_model=None):
        logp, n = sequence_logprob(model, batch["forget"])
        with torch.no_grad():
            ref_logp, _ = sequence_logprob(ref_model, batch["forget"])
        forget = npo_loss(logp, ref_logp, self.params.beta)
        metrics = {"forget_loss": token_mean(-logp.sum(), n, batch["forget"]).detach(), "npo_loss": forget.detach()}
        loss = self.params.gamma * forget
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
