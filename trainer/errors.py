"""Exceptions that carry a message for the user.

Anything the user can fix (a flag, a file, a folder) raises one of these with a message that names
the flag or path and says what to do. `train.py` prints the message without a traceback and exits
with status 2. Asserts are kept for our own invariants.
"""


class EddyError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(EddyError):
    """A flag or config value is invalid or inconsistent with another."""


class DataError(EddyError):
    """A dataset is missing, empty, unreadable or has the wrong shape."""


class CheckpointError(EddyError):
    """No usable checkpoint, or one that does not fit the current config."""


def user_message(error: EddyError) -> str:
    """The message to print. An error raised in a DataLoader worker arrives re-raised with the
    worker's traceback in its text; the user needs only the last line, the original message."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith("trainer.errors.") else last
    return text
