"""Attribute-list scanning for playlist tag lines (RFC 8216bis §4.2).

A tag line like ``#EXT-X-KEY:METHOD=AES-128,URI="k.key",IV=0x1`` is scanned left to right into
``NAME=value`` spans, with quoted-string values allowed to hold commas (and text like
``URI=``), so the rewriter can replace exactly one value's bytes and keep every other byte of
the line.

This module only reports where things are. It must never rebuild or normalise a line, never
raise on malformed input (it stops at the first thing it cannot read and reports what it
read before), and never backtrack: a huge line costs linear time.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Whitespace around names, '=' and ',' is not in the grammar, but it is harmless to accept
# and is seen in hand-written playlists.
_NAME_EQUALS = re.compile(rb"[ \t]*([A-Za-z0-9_\-]+)[ \t]*=[ \t]*")
_TRAILING_BLANKS = b" \t\r"
_BLANKS = frozenset(b" \t")


class Attribute(NamedTuple):
    """One ``NAME=value`` of an attribute list, as offsets into the scanned line."""

    name: bytes
    start: int
    """Offset of the value; for a quoted-string, of the first byte inside the quotes."""
    end: int
    """Offset just past the value; for a quoted-string, of the closing quote."""
    quoted: bool


def scan_attribute_list(line: bytes, start: int) -> list[Attribute]:
    """The attributes of ``line[start:]`` (the text after a tag's ``:``), in order.

    Stops quietly at an unterminated quoted-string or at anything that is not ``NAME=``: the
    attributes before that point are returned, the rest of the line is left to pass through.
    """
    end = len(line.rstrip(_TRAILING_BLANKS))
    attributes: list[Attribute] = []
    pos = start
    while pos < end:
        name_match = _NAME_EQUALS.match(line, pos, end)
        if name_match is None:
            break
        pos = name_match.end()
        if pos < end and line[pos] == 0x22:  # '"'
            close = line.find(b'"', pos + 1, end)
            if close < 0:
                break  # an unterminated quoted-string: its extent is unknowable
            attributes.append(Attribute(name_match.group(1), pos + 1, close, True))
            pos = close + 1
        else:
            comma = line.find(b",", pos, end)
            value_end = end if comma < 0 else comma
            while value_end > pos and line[value_end - 1] in _BLANKS:
                value_end -= 1
            attributes.append(Attribute(name_match.group(1), pos, value_end, False))
            pos = value_end
        comma = line.find(b",", pos, end)
        if comma < 0:
            break
        if line[pos:comma].strip(b" \t"):
            break  # bytes between a value and the next ',': not an attribute list we can read
        pos = comma + 1
    return attributes
