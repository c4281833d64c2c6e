"""The one error type users see: a message naming the problem, shown without a traceback."""


class TokensieveError(Exception):
    """Bad input or an unusable model; the CLI prints the message and exits with status 2."""
