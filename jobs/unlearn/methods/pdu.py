"""PDU, primal-dual unlearning (Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework
for Large Language Models", arXiv 2506.05314): minimise a logit-margin flattening loss on the forget set
subject to retain NLL <= epsilon, with a Lagrange multiplier lambda updated by dual ascent.

F      = mean_t (max_v z_t,v - mean_v z_t,v)^2       over forget target positions t (logits z_t; 0 when flat)
R      = NLL(retain)
loss   = gamma * F + lambda * (R - epsilon)          (lambda fixed within the call: the primal step)
lambda <- max(0, lambda + dual_lr * (R - epsilon))   after each call (the dual step), lambda_0 = alpha

as open-unlearning (src/trainer/unlearn/pdu.py, the authors' code; ``primal_dual: true``,
``dual_update_upon: step``): the loss uses the current lambda and lambda is then updated with the detached
retain loss of the same batch, once per ``loss`` call, i.e. per micro-batch (open-unlearning's
``compute_loss`` too). ``alpha`` is the initial lambda (open-unlearning's retain "preference";
``dual_lr`` its ``dual_step_size``; ``epsilon`` its ``retain_loss_eps``; ``dual_warmup`` counts micro-batches
where open-unlearning counts epochs). The authors' TOFU settings: alpha 100, dual_lr 5, epsilon 0.3, 5 warmup
epochs; MUSE: alpha 50, dual_lr 1, epsilon 1.5 (News) / 0.1 (Books) for Llama-2-7B, 3 warmup epochs
(community/methods/PDU/run.sh). dual_lr 0 keeps lambda = alpha (open-unlearning's ``primal_dual: false``).

Where spunge differs:
- ``epsilon`` None (the default; open-unlearning requires a value) sets it to the retain loss of the first
  batch, i.e. the constraint "retain NLL no worse than the model's at the start". The authors advise an
  epsilon somewhat above the starting retain loss; give one explicitly to do that.
- F is averaged over the forget batch's target positions (answer tokens of QA rows, every token of raw
  text); open-unlearning averages it over every position of the batch, prompt and padding included.
- With several workers, the retain loss that drives the dual step is averaged over the ranks (one small
  all-reduce per call, no host sync), so every rank holds the same lambda.
- lambda, epsilon and the call count are the method's ``state_attrs``: every resumable checkpoint holds
  them (``loop.py``), so a job restored after a failure goes on with the lambda it had reached.
Metrics: ``pdu_loss`` (F), ``pdu_lambda`` (the lambda the step's loss used), ``retain_loss``,
``forget_loss`` (forget NLL).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll, plus_later, ranks_mean
from jobs.unlearn.methods.ga_kl import target_logits


class PDUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: Optional[float] = Field(None, ge=0, description="retain NLL bound (None: the first batch's retain NLL)")
    alpha: float = Field(100.0, ge=0, description="initial lambda, the retain weight (the authors' TOFU setting)")
    dual_lr: float = Field(1.0, ge=0, description="step size of the dual ascent on lambda (0: fixed weights)")
    dual_warmup: int = Field(0, ge=0, description="calls (micro-batches) before lambda starts moving")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (flattening) term")


def flattening_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of (max logit - mean logit)^2 ([N, V] logits); 0 (with a graph) for no rows."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return ((logits.max(dim=-1).values - logits.mean(dim=-1)) ** 2).mean()


@register("pdu")
class PDU(Method):
    Params = PDUParams
    needs_retain = True
    state_attrs = ("lam", "epsilon", "calls")  # the dual ascent's state: a resumed job goes on from it

    def __init__(self, params: BaseModel):
        super().__init__(params)
        self.lam: Optional[torch.Tensor] = None  # 0-d float32 tensor on the retain loss's device
        self.epsilon: Optional[torch.Tensor] = None
        self.calls = 0

    def dual_step(self, retain: torch.Tensor) -> torch.Tensor:
        """Set up lambda and epsilon on the first call; return the lambda this call uses and advance it."""
        r = ranks_mean(retain.detach().float())
        if self.lam is None:
            self.lam = torch.tensor(float(self.params.alpha), device=r.device)
        if self.epsilon is None:
            eps = self.params.epsilon
            self.epsilon = r.clone() if eps is None else torch.tensor(float(eps), device=r.device)
        used = self.lam
        self.calls += 1
        if self.calls > self.params.dual_warmup and self.params.dual_lr > 0:
            self.lam = torch.clamp(self.lam + self.params.dual_lr * (r - self.epsilon), min=0.0)
        return used

    def loss(self, model, batch, ref_model=None):
        logits, labels = target_logits(model, batch["forget"])
        forget = flattening_loss(logits)
        with torch.no_grad():
            nll = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
        metrics = {"forget_loss": nll, "pdu_loss": forget.detach()}

        def retain_term():
            retain = mean_nll(model, batch["retain"])
            lam = self.dual_step(retain)
            metrics.update(retain_loss=retain.detach(), pdu_lambda=lam)
            return lam * (retain - self.epsilon)

        return LossOutput(plus_later(self.params.gamma * forget, retain_term), metrics)
