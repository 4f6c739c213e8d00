"""`multitune merge RUN... OUT`: one model from single-task runs of one backbone by weight merging (run.py)."""

from multitune.merge.run import merge_runs

__all__ = ["merge_runs"]
