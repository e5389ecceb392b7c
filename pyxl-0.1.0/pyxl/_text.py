"""Text from elsewhere made safe to show on one line.

A domain's name, a file's, or what a migration peer says can hold control
characters, line and paragraph separators and format characters (bidi
overrides): printed or logged as they are, they move a terminal's cursor,
retitle its window, forge a log line of their own, or reorder what is shown.
Here, below everything, so that the command line and the library's codecs
use the one rule.  May import: the standard library only.
"""

from __future__ import annotations

__all__ = ["shown"]

_UNSAFE = ("Cc", "Cf", "Zl", "Zp")


def shown(text: str, limit: int = 0) -> str:
    """``text`` with every unsafe character escaped (``\\x1b``, ``\\u202e``);
    with ``limit``, cut to that many characters, an ellipsis marking the cut."""
    import unicodedata      # here: the command line's start does not pay for it
    out = "".join(c if unicodedata.category(c) not in _UNSAFE
                  else c.encode("unicode_escape").decode("ascii") for c in text)
    if limit and len(out) > limit:
        out = out[:limit - 1] + "…"
    return out
