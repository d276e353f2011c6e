"""One exception type for everything a user can get wrong; the CLI and stages print it as one line."""


class VoxtralError(Exception):
    """A bad input or environment problem, with a message that names the file, key or value at fault."""


# What json.loads raises on bytes from anywhere: bad UTF-8 or syntax and numbers past Python's limits are
# ValueErrors, deep nesting a RecursionError. Every reader of untrusted JSON catches these (and its own lookups').
JSON_ERRORS = (ValueError, RecursionError)
