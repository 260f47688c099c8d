"""Gradient difference (Liu et al. 2022; TOFU): ascend on forget, descend on retain.

loss = -gamma * NLL(forget) + alpha * NLL(retain)
"""

from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll


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
        retain = mean_nll(model, batch["retain"])
        loss = -self.params.gamma * forget + self.params.alpha * retain
        return LossOutput(loss, {"forget_loss": forget.detach(), "retain_loss": retain.detach()})
