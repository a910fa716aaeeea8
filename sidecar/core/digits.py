"""Whether a text is a plain decimal number, as ``int()`` reads it.

``str.isdigit`` is true for "²" or "٣" too, which ``int()`` refuses (or reads as another
number): every check before an ``int()`` of outside text uses this instead.
"""

from __future__ import annotations


def digits(text: str) -> bool:
    """True for one or more ASCII digits and nothing else."""
    return text.isascii() and text.isdigit()
