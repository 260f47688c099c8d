"""Task-vector negation (Ilharco et al. 2023, "Editing Models with Task Arithmetic"; SPUNGE, Kadhe et al.
2024): fine-tune a copy on the forget data, then move the base model against that task vector.

training loss = NLL(forget)                       (descent: learn the forget data even better)
output        = base - lam * (tuned - base)

In a SPUNGE pipeline the subset task vectors are merged before negation (``order: merge_then_negate``,
as in the SPUNGE paper): the merge takes each job's ``trained`` folder and the merged model is negated.
``negate_then_merge`` merges the negated subset models instead. With TIES and one ``lam`` the two agree
(TIES' trimming and sign election are symmetric under a common negative scale), not with DARE's random
drops or per-model weights.
"""

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, mean_nll


class TVNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(1.0, gt=0, description="scale of the negated task vector")
    order: Literal["merge_then_negate", "negate_then_merge"] = "merge_then_negate"


def negate(tuned: dict, base: dict, lam: float) -> dict:
    """base - lam * (tuned - base), tensor by tensor (in float32, cast back to each tensor's dtype)."""
    return {k: (base[k].float() - lam * (tuned[k].float() - base[k].float())).to(tuned[k].dtype) for k in tuned}


@register("tvn")
class TaskVectorNegation(Method):
    Params = TVNParams

    def loss(self, model, batch, ref_model=None):
        forget = mean_nll(model, batch["forget"])
        return LossOutput(forget, {"forget_loss": forget.detach()})

    def finalize(self, trained: dict, base: dict) -> Optional[dict]:
        return negate(trained, base, self.params.lam)

    def merge_input(self) -> Optional[str]:
        return "trained" if self.params.order == "merge_then_negate" else None

    def rewrites_merge(self) -> bool:
        return self.params.order == "merge_then_negate"

    def after_merge(self, merged: dict, base: dict) -> dict:
        return negate(merged, base, self.params.lam)
