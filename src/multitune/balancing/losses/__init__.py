"""Loss weighting methods, one per file; importing this package registers them all."""

from multitune.balancing.losses import dwa, equal, famo, gradnorm, rlw, scale_invariant, static, uncertainty
from multitune.balancing.losses.base import LOSS_WEIGHTINGS, WEIGHTING_INJECTED, LossWeighting, ObservesTaskGradients

__all__ = [
    "LOSS_WEIGHTINGS",
    "WEIGHTING_INJECTED",
    "LossWeighting",
    "ObservesTaskGradients",
    "dwa",
    "equal",
    "famo",
    "gradnorm",
    "rlw",
    "scale_invariant",
    "static",
    "uncertainty",
]
