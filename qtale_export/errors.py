"""The one exception type every stage raises for bad input; the CLI prints it as one line."""


class QtaleError(Exception):
    """A user-facing error: bad argument, missing/corrupt file, unsupported model or op."""
