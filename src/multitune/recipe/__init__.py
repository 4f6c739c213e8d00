"""The training recipe: prepare, launch, the training session, two-stage, resume."""
