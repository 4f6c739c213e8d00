"""Task balancing: loss weighting, gradient aggregation, and backward.py, which writes the tasks' gradients into
.grad (regularizers add their penalties afterwards)."""
