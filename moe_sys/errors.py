"""Errors that mean "bad input from the user": the CLI prints their one-line message, exit code 2."""


class UserError(ValueError):
    """A file, directory or argument moe_sys refuses; the message names it."""
