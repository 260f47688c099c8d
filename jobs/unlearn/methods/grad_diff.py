"""Gradient difference (Liu et al. 2022; TOFU): ascend on forget, descend on retain.

loss = -gamma * NLL(forget) + alpha * NLL(retain)
"""

from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll, plus_later


class GradDiffParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(1.0, ge=0, description="weight of the forget (ascent) term")
    alpha: float = Field(1.0, ge=0, description="weight of the retain (descent) term")


@register("grad_diff")
class GradDiff(Method):
    Params = GradDiffParams
    needs_retain = True

    def loss(self, model, batch, ref_model=None):
        forget = mean_nll(model, batch["forget"])
        metrics = {"forget_loss": forget.detach()}

        def retain_term():
            retain = mean_nll(model, batch["retain"])
            metrics["retain_loss"] = retain.detach()
            return self.params.alpha * retain

        return LossOutput(plus_later(-self.params.gamma * forget, retain_term), metrics)
