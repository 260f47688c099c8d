"""Weighted gradient ascent, WGA (Wang, Zhou, Zhou, Shin, Han, Weinberger 2025, "Rethinking LLM Unlearning
Objectives: A Gradient Perspective and Go Beyond", ICLR): gradient ascent with each forget token's NLL
weighted by its own probability raised to a power, so tokens already forgotten stop pulling.

p_t    = pi(y_t | x, y_<t)                       at every forget target position t (labels != -100)
w_t    = p_t ** beta                             (detached: a weight, not part of the gradient)
loss   = -gamma * mean_t(w_t * (-log p_t)) + alpha * NLL(retain)

The mean runs over all target tokens of the batch, as in the authors' code (tmlr-group/G-effect,
dataloader.py, loss "wga", power ``hyper_param``, no retain term) and open-unlearning
(src/trainer/unlearn/wga.py, ``compute_wga_loss`` in src/trainer/utils.py; configs/trainer/WGA.yaml: beta 1,
gamma 1, alpha 1 with a retain NLL term, the defaults here). The weight p^beta cancels the 1/p_t factor of
each token's GA gradient (the "inverse confidence" the paper identifies as GA's cause of excessive
unlearning) in part (beta < 1) or fully (beta = 1), so tokens already forgotten stop pulling; beta 0 is
plain GA. ``gamma``/``alpha`` weigh the forget and retain terms as in every spunge method. open-unlearning
loads a reference model for its optional KL retain term; the retain term here is NLL, so none is loaded.
"""

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, with_retain
from jobs.unlearn.methods.ga_kl import target_logits


class WGAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(1.0, ge=0, description="power of the token weight p**beta (0: plain gradient ascent)")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (weighted ascent) term")
    alpha: float = Field(1.0, ge=0, description="weight of the retain NLL term (0 turns it off)")


def target_nll(model, part: dict) -> torch.Tensor:
    """Per-token NLL ([N], float, with gradient) of a batch's target tokens."""
    logits, labels = target_logits(model, part)
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def weighted_ascent(nll: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """-mean(weight * nll) over the target tokens, weights detached; 0 (with a graph) for no tokens."""
    if nll.numel() == 0:
        return nll.sum() * 0.0
    return -(weight.detach() * nll).mean()


def safe_mean(x: torch.Tensor) -> torch.Tensor:
    return x.sum() / max(x.numel(), 1)


@register("wga")
class WGA(Method):
    Params = WGAParams
    needs_retain = True

    def loss(self, model, batch, ref_model=None):
        nll = target_nll(model, batch["forget"])
        p = torch.exp(-nll.detach())
        forget = weighted_ascent(nll, p**self.params.beta)
        metrics = {"forget_loss": safe_mean(nll.detach()), "wga_loss": forget.detach()}
        loss = self.params.gamma * forget
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
