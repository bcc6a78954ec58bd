"""The base of every error the user can fix. Each layer has its own subclass (engine, training, server).

The message says what is wrong, where (file, line, field) and how to fix it; the CLI prints it without a
traceback and exits with status 1.
"""


class MiniMindError(Exception):
    """Bad input or state that the user can fix; the message is shown as is."""
