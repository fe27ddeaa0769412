"""Attribute-list scanning for playlist tag lines (RFC 8216bis §4.2).

A tag line like ``#EXT-X-KEY:METHOD=AES-128,URI="k.key",IV=0x1`` is scanned left to right into
``NAME=value`` spans, with quoted-string values allowed to hold commas (and text like
``URI=``), so the rewriter can replace exactly one value's bytes and keep every other byte of
the line.

This module only reports where things are. It must never rebuild or normalise a line, never
raise on malformed input (it stops at the first thing it cannot read and reports what it
read before), and never search: every match is anchored where the previous one ended, so a
huge or hostile line costs linear time.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

# One attribute and the ',' after it. Whitespace around names, '=' and ',' is not in the
# grammar, but it is harmless to accept and is seen in hand-written playlists. Bytes between
# a closing quote and the next ',' are skipped, as players do (the quoted value still counts).
# Possessive quantifiers: a failed match gives nothing back, so it cannot backtrack at length.
_ATTRIBUTE: Final = re.compile(
    rb'[ \t]*+([A-Za-z0-9_\-]++)[ \t]*+=[ \t]*+(?:"([^"]*+)"[^,]*+|([^",]*+))(?:,|\Z)'
)
_TRAILING_BLANKS: Final = b" \t\r"
_BLANK_BYTES: Final = frozenset(b" \t")

Attribute: TypeAlias = tuple[bytes, int, int, bool]
"""``(name, start, end, quoted)``: the value is ``line[start:end]``; for a quoted-string the
span is inside the quotes. A plain tuple, because the rewriter makes thousands of them."""


def scan_attribute_list(line: bytes, start: int) -> list[Attribute]:
    """The attributes of ``line[start:]`` (the text after a tag's ``:``), in order.

    Stops quietly at an unterminated quoted-string or at anything that is not
    ``NAME=value``: the attributes before that point are returned, the rest of the line is
    left to pass through.
    """
    end = len(line.rstrip(_TRAILING_BLANKS))
    attributes: list[Attribute] = []
    append = attributes.append
    match = _ATTRIBUTE.match
    pos = start
    while pos < end:
        found = match(line, pos, end)
        if found is None:
            break
        pos = found.end()
        value_start = found.start(2)
        if value_start >= 0:
            append((found.group(1), value_start, found.end(2), True))
        else:
            value_start, value_end = found.span(3)
            # Blanks before the ',' are not part of an unquoted value.
            while value_end > value_start and line[value_end - 1] in _BLANK_BYTES:
                value_end -= 1
            append((found.group(1), value_start, value_end, False))
    return attributes
