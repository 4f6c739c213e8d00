"""The training loop and atomic checkpoint files."""
