"""One exception type for everything a user can get wrong; the CLI and stages print it as one line."""


class VoxtralError(Exception):
    """A bad input or environment problem, with a message that names the file, key or value at fault."""
