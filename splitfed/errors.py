"""Errors that a user can cause and fix: the CLIs print them on one line and exit with code 2."""


class UserError(Exception):
    """A problem with the user's input (path, data, config), reported without a traceback."""


def refuse(problem: str | None) -> None:
    """Raise `problem` as a UserError; None (no problem) passes."""
    if problem:
        raise UserError(problem)
