"""multitune: fine-tune one pretrained model on several tasks at once."""

__version__ = "0.1.0"
