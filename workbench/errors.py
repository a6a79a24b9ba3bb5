"""Errors that the command line turns into one clear sentence and an exit status.

`BadInput` is the user's to fix (a wrong path, a malformed line, a model name that cannot be
loaded): exit status 2, nothing stored changes. Anything else raised while a run computes is a
failed run: it is recorded in `runs` with its error and the command exits with status 1.
"""


class BadInput(Exception):
    """Bad usage or bad input: the message is one sentence naming the bad thing."""
