"""The command line's user errors: one line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

__all__ = ["UserError", "key_error", "one_line", "MESSAGE_LIMIT"]

# Messages longer than this are shortened at a word boundary.
MESSAGE_LIMIT = 400


class UserError(Exception):
    """A mistake in the command line or the config: reported as one line, exit code 2."""


def key_error(key: str, message: str) -> UserError:
    """The UserError of a bad config key (a dotted path such as "scenario.class")."""
    return UserError(f"config key '{key}': {message}")


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line (each run of whitespace becomes one space), shortened to at most `limit`
    characters plus " ..." at a word boundary when longer; a word is never cut."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(" ", 0, limit + 1)
    if cut <= 0:  # the first word alone is longer than the limit: keep it whole
        cut = flat.find(" ")
        if cut < 0:
            return flat
    return flat[:cut] + " ..."
