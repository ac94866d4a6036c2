class InputError(ValueError):
    """A problem with what the user gave us (files, flags, models); the CLI prints it as one line."""


class OutputError(OSError):
    """A file or folder could not be written (a full disk, no permission, a serializer's own error class):
    ``path`` is the final name the user asked for, ``reason`` what went wrong. An OSError, so code that
    catches OSError around writing still catches it; the CLI prints it as one line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # pickled (multiprocessing) with its two arguments, not the composed message
        return type(self), (self.path, self.reason)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
