"""Gradient ascent (Jang et al. 2023; Yao et al. 2024): maximise the NLL of the forget answers."""

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll


@register("ga")
class GradientAscent(Method):
    def loss(self, model, batch, ref_model=None):
        forget = mean_nll(model, batch["forget"])
        return LossOutput(-forget, {"forget_loss": forget.detach()})
