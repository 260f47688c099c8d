"""SatImp (Yang, Wang, Huang, Liu, Zhang, Han 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
Unlearning", ICML): gradient ascent with each forget token's NLL weighted by a saturation factor p^beta1
(tokens already unlikely weigh less) times an importance factor (1 - p)^beta2.

p_t    = pi(y_t | x, y_<t)                       at every forget target position t (labels != -100)
w_t    = p_t ** beta1 * (1 - p_t) ** beta2       (detached)
loss   = -gamma * mean_t(w_t * (-log p_t)) + alpha * NLL(retain)

As open-unlearning (src/trainer/unlearn/satimp.py, ``compute_satimp_loss`` in src/trainer/utils.py) and the
authors' code (tmlr-group/SatImp, dataloader/dataloader_sat.py, loss "satimp_gd", where ``hyper_param`` is
beta1 and ``beta`` is beta2): the mean runs over all target tokens of the batch. Defaults are those of
open-unlearning's configs/trainer/SatImp.yaml: beta1 5, beta2 1, gamma 0.1, alpha 1 (retain NLL). The
authors' "satimp_gd" weighs forget 1 and retain ``coeff`` 0.1 instead (gamma 1, alpha 0.1 here; also
open-unlearning's class defaults) and sets beta1, beta2 per run. No reference model: open-unlearning loads
one only for its optional KL retain term.
"""

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, with_retain
from jobs.unlearn.methods.wga import safe_mean, target_nll, weighted_ascent


class SatImpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta1: float = Field(5.0, ge=0, description="power of the saturation weight p**beta1")
    beta2: float = Field(1.0, ge=0, description="power of the importance weight (1 - p)**beta2")
    gamma: float = Field(0.1, ge=0, description="weight of the forget (weighted ascent) term")
    alpha: float = Field(1.0, ge=0, description="weight of the retain NLL term (0 turns it off)")


def satimp_weight(p: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    return p**beta1 * (1.0 - p) ** beta2


@register("satimp")
class SatImp(Method):
    Params = SatImpParams
    needs_retain = True

    def loss(self, model, batch, ref_model=None):
        nll = target_nll(model, batch["forget"])
        p = torch.exp(-nll.detach())
        forget = weighted_ascent(nll, satimp_weight(p, self.params.beta1, self.params.beta2))
        metrics = {"forget_loss": safe_mean(nll.detach()), "satimp_loss": forget.detach()}
        loss = self.params.gamma * forget
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
