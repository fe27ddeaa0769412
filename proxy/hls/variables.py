"""Playlist variables: EXT-X-DEFINE and ``{$name}`` substitution (RFC 8216bis §4.3, §4.4.2.3).

The proxy resolves variables itself and drops the EXT-X-DEFINE lines, because the player only
ever sees rewritten playlists: it cannot read the query of the upstream URL (QUERYPARAM) nor
the upstream multivariant playlist (IMPORT).

This module must never re-scan substituted text (one pass: text that a substitution brings in
stays as it is), never let a value holding CR, LF or a double quote into a playlist (it would
forge lines or break a quoted-string), and never raise: an undefined or malformed definition
simply defines nothing, and its references are left as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from urllib.parse import unquote

from proxy.hls.attributes import scan_attribute_list

_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_REFERENCE = re.compile(rb"\{\$([A-Za-z0-9_\-]+)\}")
# RFC 8216bis §4.2: a quoted-string cannot hold these; neither may a variable value.
_FORBIDDEN_IN_VALUE = re.compile(r'["\r\n]')


class Variables:
    """The variables defined so far in one playlist, in definition order."""

    __slots__ = ("_encoded", "_text")

    def __init__(self) -> None:
        self._text: dict[str, str] = {}
        self._encoded: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._text)

    def define(self, name: str, value: str) -> bool:
        """Define ``name`` unless it is invalid or already defined; True when it was defined.

        The RFC forbids a second definition of a name; the first one wins, as in hls.js and
        Shaka Player.
        """
        if name in self._text or not _NAME.fullmatch(name) or _FORBIDDEN_IN_VALUE.search(value):
            return False
        self._text[name] = value
        self._encoded[name.encode()] = value.encode("utf-8", "surrogateescape")
        return True

    def substitute(self, text: bytes) -> bytes:
        """``text`` with every reference to a defined variable replaced, in one pass."""
        if b"{$" not in text:
            return text
        encoded = self._encoded
        return _REFERENCE.sub(lambda m: encoded.get(m.group(1), m.group(0)), text)

    def as_mapping(self) -> Mapping[str, str]:
        """A read-only snapshot."""
        return MappingProxyType(dict(self._text))


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def query_parameter(url: str, name: str) -> str | None:
    """The percent-decoded value of the first query parameter ``name`` of ``url``.

    RFC 8216bis §4.4.2.3 QUERYPARAM: "The value associated with the query parameter MUST be
    percent-decoded"; a parameter without a value (``?token``) does not define the variable.
    '+' is not a space here: this is RFC 3986 percent-decoding, not form decoding.
    """
    _, question, query = url.partition("#")[0].partition("?")
    if not question:
        return None
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        if equals and unquote(key, errors="surrogateescape") == name:
            return unquote(value, errors="surrogateescape")
    return None


def define_from_line(
    line: bytes,
    colon: int,
    variables: Variables,
    *,
    query_urls: tuple[str, ...],
    imported: Mapping[str, str],
) -> None:
    """Apply one ``#EXT-X-DEFINE:`` line (``colon`` is the offset of its ':') to ``variables``.

    ``query_urls`` are searched in order for QUERYPARAM; ``imported`` holds the variables of
    the multivariant playlist that loaded this one, for IMPORT.
    """
    attributes = {
        name: line[start:end]
        for name, start, end, quoted in scan_attribute_list(line, colon + 1)
        if quoted
    }
    if b"NAME" in attributes:
        value = attributes.get(b"VALUE")
        if value is not None:
            # VALUE is a quoted-string like any other: references to variables defined above
            # are resolved (as hls.js does), so no reference survives the dropped DEFINE lines.
            variables.define(_text(attributes[b"NAME"]), _text(variables.substitute(value)))
    elif b"IMPORT" in attributes:
        name = _text(attributes[b"IMPORT"])
        if name in imported:
            variables.define(name, imported[name])
    elif b"QUERYPARAM" in attributes:
        name = _text(attributes[b"QUERYPARAM"])
        for url in query_urls:
            found = query_parameter(url, name)
            if found is not None:
                variables.define(name, found)
                break
