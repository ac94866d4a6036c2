class InputError(ValueError):
    """A problem with what the user gave us (files, flags, models); the CLI prints it as one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
