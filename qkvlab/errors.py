"""User-facing errors: the CLI prints them on one line and exits with code 2."""


class QkvlabError(ValueError):
    """Bad input from a user (a name, a size, a file): a one-line message, no traceback."""


def check(condition: object, message: str) -> None:
    """Raise `QkvlabError(message)` unless `condition` holds."""
    if not condition:
        raise QkvlabError(message)
