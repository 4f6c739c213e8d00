"""Task balancing: loss weighting (and, later, gradient aggregation); backward.py is the one writer of .grad."""
