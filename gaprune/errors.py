class InputError(ValueError):
    """A problem with what the user gave us (files, flags, models); the CLI prints it as one line."""
