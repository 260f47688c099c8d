"""Gradient ascent with a KL term on retain data (Yao et al. 2024 "Machine Unlearning of Pre-trained Large
Language Models", GA+KL; TOFU's "KL" baseline; open-unlearning's GradDiff with ``retain_loss_type: KL``).

kl     = mean over retain target tokens t of  sum_v p_ref(v|t) * (log p_ref(v|t) - log p(v|t))   = KL(p_ref || p)
loss   = -gamma * NLL(forget) + alpha * kl

open-unlearning (src/trainer/utils.py ``compute_kl_divergence``) averages the same KL over every position of
the batch (prompt and padding included); Yao et al.'s ``compute_kl`` (llm_unlearn/methods/
ascent_plus_KLdivergence.py) uses the cross-entropy ``-sum p_ref log p``, which has the same gradient. Here
the KL is averaged over the retain batch's target positions (labels != -100), the tokens the retain NLL
would train: answer tokens for QA retain data, every token for general text (``retain_source: general``).
"""

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import IGNORE_INDEX
from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll, plus_later


class GAKLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (ascent) term")
    alpha: float = Field(1.0, ge=0, description="weight of the KL(p_ref || p) term on retain data")


def target_logits(model, part: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits at the target positions of a batch ([N, V], float) and their labels ([N])."""
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    labels = part["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    return logits[:, :-1, :][mask].float(), labels[mask]


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(ref_logits) || softmax(logits)); 0 for no rows."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


@register("ga_kl")
class GAKL(Method):
    Params = GAKLParams
    needs_reference = True
    needs_retain = True

    def loss(self, model, batch, ref_model=None):
        forget = mean_nll(model, batch["forget"])
        metrics = {"forget_loss": forget.detach()}

        def kl_term():
            logits, labels = target_logits(model, batch["retain"])
            with torch.no_grad():
                ref_logits, _ = target_logits(ref_model, batch["retain"])
                metrics["retain_loss"] = (
                    torch.nn.functional.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
                )
            kl = token_kl(ref_logits, logits)
            metrics["kl"] = kl.detach()
            return self.params.alpha * kl

        return LossOutput(plus_later(-self.params.gamma * forget, kl_term), metrics)
