"""UNDIAL (Dong, Lin, Belkin, Huerta, Vulić 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models", NAACL): distil the model towards the frozen original model's own
next-token distribution with the logit of the true token lowered by a fixed strength.

z_ref  = logits of the reference (original) model          at every forget target position t (labels != -100)
q_t    = softmax(z_ref,t - beta * onehot(y_t))               (fixed target, no gradient)
loss   = gamma * mean_t CE(q_t, softmax(z_t)) + alpha * NLL(retain)
       = gamma * mean_t KL(q_t || pi_t) + const            (same gradient)

as open-unlearning (src/trainer/unlearn/undial.py, ``compute_undial_loss`` in src/trainer/utils.py;
configs/trainer/UNDIAL.yaml: beta 10, gamma 1, alpha 0, the defaults here). ``beta`` is the paper's
adjustment strength, under open-unlearning's name (``gamma``/``alpha`` weigh the forget and retain terms in
every spunge method). open-unlearning's config trains on the forget set alone (alpha 0); ``alpha`` adds a
retain NLL term when retain data is configured.

Differs from open-unlearning in one place: its ``compute_undial_loss`` averages the cross-entropy over every
position of the batch (prompt and padding included, where the -100 label indexes the last vocabulary
entries); here it is averaged over the forget batch's target positions, the tokens the paper adjusts
(answer tokens of QA rows, every token of raw text). The metric ``undial_loss`` is the KL (0 while the model
is its reference and beta = 0), ``forget_loss`` the usual forget NLL.
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, with_retain
from jobs.unlearn.methods.ga_kl import target_logits


class UNDIALParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(10.0, ge=0, description="strength: how far the true token's reference logit is lowered")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (self-distillation) term")
    alpha: float = Field(0.0, ge=0, description="weight of the retain NLL term (0: off, as in the paper)")


@torch.no_grad()
def adjusted_target(ref_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """softmax(ref_logits - beta * onehot(labels)) over the vocabulary ([N, V] float, [N] -> [N, V])."""
    adjusted = ref_logits.float().clone()
    adjusted[torch.arange(len(labels), device=labels.device), labels] -= beta
    return torch.softmax(adjusted, dim=-1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_v target_v * log softmax(logits)_v; 0 (with a graph) for no rows."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@register("undial")
class UNDIAL(Method):
    Params = UNDIALParams
    needs_reference = True

    def loss(self, model, batch, ref_model=None):
        logits, labels = target_logits(model, batch["forget"])
        with torch.no_grad():
            ref_logits, _ = target_logits(ref_model, batch["forget"])
            target = adjusted_target(ref_logits, labels, self.params.beta)
            entropy = -(target * torch.log(target.clamp(min=1e-30))).sum(-1)
        forget = soft_cross_entropy(logits, target)
        with torch.no_grad():
            nll = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
            kl = forget - (entropy.mean() if len(labels) else 0.0)
        metrics = {"forget_loss": nll, "undial_loss": kl}
        loss = self.params.gamma * forget
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
