"""`multitune export RUN_DIR --task T OUT`: one task of a run as a standalone Hugging Face folder
(model.py: the weights, merged adapters, the head and its loader, optional ONNX; card.py: the model card)."""

from multitune.export.card import data_licenses, metric_lines
from multitune.export.model import export_task

__all__ = ["data_licenses", "export_task", "metric_lines"]
