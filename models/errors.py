"""The model layer's error type (one per layer): checkpoints, configs, export and tokenizer files."""

from minimind.errors import MiniMindError


class ModelError(MiniMindError):
    """A model, checkpoint or tokenizer file that cannot be read, converted or written."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be read, converted or written; the message names the file and the problem."""
