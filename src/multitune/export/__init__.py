"""`multitune export RUN_DIR --task T OUT`: one task of a run as a standalone Hugging Face folder
(model.py: the weights, merged adapters, the head and its loader, optional ONNX; card.py: the model card);
`--format vllm`: a causal LM's generation tasks as a base model and per-task LoRA adapters (vllm.py)."""

from multitune.export.card import data_licenses, metric_lines
from multitune.export.model import export_task
from multitune.export.vllm import export_vllm

__all__ = ["data_licenses", "export_task", "export_vllm", "metric_lines"]
