"""CE-U, cross-entropy unlearning (Bo Yang 2025, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224):
cross-entropy of the model towards its own next-token distribution with the true token removed.

q_t    = softmax(z_t with z_t[y_t] = -inf)           (z_t the model's logits, detached: a fixed target)
loss   = mean_t CE(q_t, softmax(z_t)) + alpha * NLL(retain)
       = mean_t [ -sum_{v != y_t} q_t,v * log pi(v | x, y_<t) ]

over the forget target positions t (labels != -100) except the first ``ignore_first_n`` of each row. The
gradient with respect to the logits is softmax(z_t) - q_t: it lowers the true token's logit by p_t and
raises every other token in proportion to its share, and it vanishes as p_t -> 0 (no runaway, unlike GA).
As open-unlearning (src/trainer/unlearn/ceu.py, ``cross_entropy_unlearning_loss``, ``compute_batch_ceu``),
including its ``ignore_first_n_answer_tokens`` (default 1; the paper's footnote on training settings: the
first answer token is left alone) and its mean over the kept positions. open-unlearning's CE-U has no retain
term; ``alpha`` (default 0) adds a retain NLL term when retain data is configured. The loss is reported as
``ce_u_loss``; ``forget_loss`` is the NLL over all forget target tokens.
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import IGNORE_INDEX
from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, token_mean_nll, with_retain


class CEUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ignore_first_n: int = Field(1, ge=0, description="leave the first n target tokens of each row out of the loss")
    alpha: float = Field(0.0, ge=0, description="weight of the retain NLL term (0: off, as in open-unlearning)")


def drop_first_targets(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``labels`` [B, T] with the first ``n`` targets (not -100) of each row set to -100."""
    valid = labels != IGNORE_INDEX
    first = (valid.cumsum(dim=-1) <= n) & valid
    return labels.masked_fill(first, IGNORE_INDEX)


def ce_u_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE-U over logits [B, T, V] and labels [B, T] (not yet shifted; -100 where no target)."""
    shifted, target = logits[:, :-1, :], labels[:, 1:]
    mask = target != IGNORE_INDEX
    z, y = shifted[mask].float(), target[mask]
    if z.shape[0] == 0:
        return logits.sum() * 0.0
    with torch.no_grad():
        q = torch.softmax(z.scatter(-1, y.unsqueeze(-1), float("-inf")), dim=-1)
    return -(q * F.log_softmax(z, dim=-1)).sum(-1).mean()


@register("ce_u")
class CEU(Method):
    Params = CEUParams

    def loss(self, model, batch, ref_model=None):
        part = batch["forget"]
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        loss = ce_u_loss(logits, drop_first_targets(part["labels"], self.params.ignore_first_n))
        with torch.no_grad():
            forget = token_mean_nll(logits, part["labels"], part)
        metrics = {"forget_loss": forget, "ce_u_loss": loss.detach()}
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)
