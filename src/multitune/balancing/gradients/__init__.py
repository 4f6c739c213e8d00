"""Gradient aggregation methods, one per file; importing this package registers them all."""

from multitune.balancing.gradients import (
    aligned_mtl,
    cagrad,
    graddrop,
    gradvac,
    imtl,
    mgda,
    nash_mtl,
    pcgrad,
    sum,
    upgrad,
)
from multitune.balancing.gradients.base import (
    AGGREGATOR_INJECTED,
    GRADIENT_AGGREGATORS,
    SOURCES,
    GradientAggregator,
    GramianAggregator,
    gramian,
)

__all__ = [
    "AGGREGATOR_INJECTED",
    "GRADIENT_AGGREGATORS",
    "SOURCES",
    "GradientAggregator",
    "GramianAggregator",
    "aligned_mtl",
    "cagrad",
    "graddrop",
    "gradvac",
    "gramian",
    "imtl",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "sum",
    "upgrad",
]
