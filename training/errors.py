"""The training layer's error type: bad configs, bad data lines, checkpoints that cannot be resumed."""

from minimind.errors import MiniMindError


class TrainingError(MiniMindError):
    """A training input or state the user can fix; the message names the file/line or field and the fix."""
