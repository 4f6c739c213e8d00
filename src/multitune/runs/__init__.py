"""Finished runs: the run directory's layout, and loading one to evaluate, predict, serve or export."""
