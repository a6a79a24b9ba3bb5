"""Errors that the command line turns into one clear sentence and an exit status.

`BadInput` is the user's to fix (a wrong path, a malformed line, a model name that cannot be
loaded): exit status 2, nothing stored changes. Anything else raised while a run computes is a
failed run: it is recorded in `runs` with its error and the command exits with status 1.
"""

from pathlib import Path


class BadInput(Exception):
    """Bad usage or bad input: the message is one sentence naming the bad thing."""


def read_text(path: Path, *, max_bytes: int | None = None) -> str:
    """A user's file as UTF-8 text; BadInput naming the file when it is missing, unreadable,
    larger than `max_bytes` or not UTF-8."""
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise BadInput(f"{path}: larger than {max_bytes:,} bytes")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise BadInput(f"{path}: file not found") from err
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text (byte {err.start})") from err
