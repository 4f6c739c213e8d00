"""The bottom layer: helpers every other package may use (files, random state, process groups, the history
file's format)."""
