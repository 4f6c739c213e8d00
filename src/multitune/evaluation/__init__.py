"""Per-task metrics, evaluation of a model on a split, and the metrics table."""
