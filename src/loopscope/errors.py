"""Errors that reach the user as one clear line."""


class UserError(Exception):
    """Bad arguments, a bad target file or a factory that failed: print the message, exit 2."""
