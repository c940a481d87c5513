"""Built-in loss plugins: mse, huber, pseudo-huber, smooth-l1.

Each factory takes its options and returns ``loss(prediction, target, **info) -> (B,) tensor``: the
per-sample mean, so the trainer can apply per-sample weights (regularisation weight, timestep weighting).
torch is imported inside the functions, so listing plugins stays fast.
"""
from __future__ import annotations

import attrs

from lora_run.hookspecs import hookimpl
from lora_run.schema import option


def _per_sample(elementwise):
    return elementwise.flatten(1).mean(dim=1)


def mse(_options=None):
    def loss(prediction, target, **_info):
        return _per_sample((prediction.float() - target.float()) ** 2)
    return loss


@attrs.frozen(kw_only=True)
class HuberOptions:
    c: float = option(0.1, "Transition point between the quadratic and the linear part.", gt=0.0, le=100.0)


def huber(options: HuberOptions | None = None):
    """Classic Huber: 0.5·x² for |x| ≤ c, c·(|x| − 0.5·c) beyond."""
    import torch

    c = (options or HuberOptions()).c

    def loss(prediction, target, **_info):
        return _per_sample(torch.nn.functional.huber_loss(prediction.float(), target.float(), reduction="none",
                                                          delta=c))
    return loss


def pseudo_huber(options: HuberOptions | None = None):
    """Pseudo-Huber: 2c·(sqrt(x² + c²) − c); ≈ x² near 0, ≈ 2c|x| far out (sd-scripts' `huber`)."""
    import torch

    c = (options or HuberOptions()).c

    def loss(prediction, target, **_info):
        diff = prediction.float() - target.float()
        return _per_sample(2 * c * (torch.sqrt(diff * diff + c * c) - c))
    return loss


@attrs.frozen(kw_only=True)
class SmoothL1Options:
    beta: float = option(1.0, "Below |x| < beta the loss is quadratic.", gt=0.0, le=100.0)


def smooth_l1(options: SmoothL1Options | None = None):
    import torch

    beta = (options or SmoothL1Options()).beta

    def loss(prediction, target, **_info):
        return _per_sample(torch.nn.functional.smooth_l1_loss(prediction.float(), target.float(), reduction="none",
                                                              beta=beta))
    return loss


@hookimpl
def register_losses(register):
    register("mse", mse, description="mean squared error")
    register("huber", huber, options=HuberOptions, description="Huber loss with threshold c")
    register("pseudo-huber", pseudo_huber, options=HuberOptions, description="pseudo-Huber 2c(sqrt(x²+c²)−c)")
    register("smooth-l1", smooth_l1, options=SmoothL1Options, description="smooth L1 with beta")
