"""The Python API: `fit(backbone, tasks, ...)` trains any PyTorch backbone on in-memory tasks (fit.py);
tensors.py checks the tasks' arrays into tensors, backbone.py wraps the backbone, fitted.py is the result."""

from multitune.api.fit import fit
from multitune.api.fitted import FittedModel
from multitune.api.tensors import Task

__all__ = ["FittedModel", "Task", "fit"]
