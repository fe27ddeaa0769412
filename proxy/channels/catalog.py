"""The channel catalog: ``[[channels]]`` plus every ``[[channel_lists]]`` list, by stable id.

Lists are read from a file (in a thread: a 10,000-channel list must not block the event loop)
or fetched through :class:`~proxy.upstream.client.UpstreamClient` (SSRF guard, timeouts), and
reloaded every ``refresh_interval`` seconds. A reload swaps the whole mapping at once; sessions
that are playing are not touched (they hold their own copy of what they need).

Ids are stable across reloads: tvg-id, else a slug of the name, with ``-2``, ``-3``… for
duplicates in list order. Config channels win an id over listed ones. Never a URL part in an id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy.channels.m3u import M3uEntry, parse_m3u
from proxy.channels.model import Channel, ChannelKind, channel_id
from proxy.channels.urls import acestream_url, guess_kind, is_xtream_list, split_kodi_headers
from proxy.errors import HlsRelayError, UpstreamError, UpstreamStatus, UpstreamTimeout
from proxy.settings import ChannelListSettings, ChannelSettings, Settings
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("hlsrelay.channels")

# Lists bigger than this are parsed in a worker thread (a few ms of parsing is fine inline).
_THREAD_PARSE_BYTES = 256 * 1024
_MAX_LIST_BYTES = 64 * 1024 * 1024
_TS_SYNC = 0x47


def config_channel(spec: ChannelSettings, engine: str) -> Channel:
    """A ``[[channels]]`` entry as a :class:`Channel` (AceStream and Kodi forms resolved)."""
    url, kodi_headers = split_kodi_headers(spec.url.strip())
    url = acestream_url(url, engine) or url
    backups = tuple(acestream_url(b, engine) or b for b in spec.backup_urls)
    headers = {**kodi_headers, **spec.headers}
    return Channel(
        id=spec.id,
        name=spec.name or spec.id,
        url=url,
        headers=tuple(headers.items()),
        kind=spec.kind or guess_kind(url),
        backup_urls=backups,
        logo=spec.logo,
        group=spec.group,
        attributes=tuple(
            (k, v)
            for k, v in (
                ("tvg-id", spec.id),
                ("tvg-name", spec.name or spec.id),
                ("tvg-logo", spec.logo),
                ("group-title", spec.group),
            )
            if v
        ),
        from_config=True,
    )


def listed_channels(
    entries: Iterable[M3uEntry], engine: str, default_kind: ChannelKind | None = None
) -> list[Channel]:
    """M3U entries as channels, before id de-duplication. Only http(s) and AceStream sources:
    anything else (rtmp, udp, a local path) cannot be proxied and is skipped."""
    channels = []
    for entry in entries:
        url = acestream_url(entry.url, engine) or entry.url
        if not url.startswith(("http://", "https://")):
            continue
        name = entry.title or entry.attribute("tvg-name") or "channel"
        channels.append(
            Channel(
                id=channel_id(entry.attribute("tvg-id"), name, url),
                name=name,
                url=url,
                headers=tuple(entry.headers.items()),
                kind=guess_kind(url) or default_kind,
                logo=entry.attribute("tvg-logo"),
                group=entry.group,
                attributes=tuple(entry.attributes),
            )
        )
    return channels


def xtream_list_url(url: str) -> str:
    """An Xtream ``get.php`` URL that asks for the extended list with TS streams."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {k for k, _ in query}
    if "type" not in names:
        query.append(("type", "m3u_plus"))
    if "output" not in names:
        query.append(("output", "ts"))
    return urlunsplit(parts._replace(query=urlencode(query, safe=":/")))


def merge(config: list[Channel], listed: Iterable[Channel]) -> dict[str, Channel]:
    """One mapping by id: config first, listed channels after, duplicates numbered in order."""
    by_id: dict[str, Channel] = {c.id: c for c in config}
    for channel in listed:
        wanted = channel.id
        candidate, n = wanted, 1
        while candidate in by_id:
            n += 1
            candidate = f"{wanted}-{n}"
        by_id[candidate] = channel if candidate == wanted else replace(channel, id=candidate)
    return by_id


class ChannelCatalog:
    """Every channel by id; lists reloaded in the background."""

    def __init__(self, settings: Settings, client: UpstreamClient) -> None:
        self._settings = settings
        self._client = client
        self._engine = str(settings.live.acestream_engine).rstrip("/")
        self._config = [config_channel(spec, self._engine) for spec in settings.channels]
        self._lists: dict[int, list[Channel]] = {}
        self._channels: dict[str, Channel] = merge(self._config, [])
        self._probed: dict[str, ChannelKind] = {}

    # -- reading --------------------------------------------------------------------------------

    def get(self, channel_id: str) -> Channel | None:
        channel = self._channels.get(channel_id)
        if channel is not None and channel.kind is None and channel_id in self._probed:
            return replace(channel, kind=self._probed[channel_id])
        return channel

    def all(self) -> list[Channel]:
        return [self.get(cid) or c for cid, c in self._channels.items()]

    def __len__(self) -> int:
        return len(self._channels)

    # -- loading lists --------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every list once (a failing list is logged and keeps its last good channels)."""
        for index, spec in enumerate(self._settings.channel_lists):
            await self.load(index, spec)

    async def load(self, index: int, spec: ChannelListSettings) -> None:
        try:
            text, base_url, default_kind = await self._read(spec)
            if len(text) > _THREAD_PARSE_BYTES:
                parsed = await asyncio.to_thread(parse_m3u, text, base_url)
            else:
                parsed = parse_m3u(text, base_url)
        except (OSError, UnicodeDecodeError, HlsRelayError) as exc:
            log.warning("channel list %d could not be loaded: %s", index, _reason(exc))
            return
        self._lists[index] = listed_channels(parsed.entries, self._engine, default_kind)
        self._rebuild()
        log.info("channel list %d: %d channels", index, len(self._lists[index]))

    def _rebuild(self) -> None:
        listed = [c for index in sorted(self._lists) for c in self._lists[index]]
        self._channels = merge(self._config, listed)

    async def _read(self, spec: ChannelListSettings) -> tuple[str, str | None, ChannelKind | None]:
        if spec.path is not None:
            data = await asyncio.to_thread(_read_file, spec.path)
            return data.decode("utf-8", errors="replace"), None, None
        assert spec.url is not None
        url = spec.url
        default_kind: ChannelKind | None = None
        if is_xtream_list(url):
            url = xtream_list_url(url)
            output = dict(parse_qsl(urlsplit(url).query)).get("output", "ts")
            default_kind = "hls" if output in ("m3u8", "hls") else "ts"
        async with await self._client.open(url, spec.headers, kind="channel_list") as response:
            if response.status >= 300:
                raise UpstreamStatus(response.status)
            body = await response.read_capped(_MAX_LIST_BYTES)
            return body.decode("utf-8", errors="replace"), response.final_url, default_kind

    async def refresh_forever(self) -> None:
        """Reload each list on its interval (lists with interval 0 were loaded once)."""
        specs = [(i, s) for i, s in enumerate(self._settings.channel_lists) if s.refresh_interval]
        if not specs:
            return
        loop = asyncio.get_running_loop()
        due = {i: loop.time() + s.refresh_interval for i, s in specs}
        while True:
            now = loop.time()
            index = min(due, key=due.__getitem__)
            await asyncio.sleep(max(0.0, due[index] - now))
            spec = self._settings.channel_lists[index]
            await self.load(index, spec)
            due[index] = loop.time() + spec.refresh_interval

    # -- kinds ----------------------------------------------------------------------------------

    async def resolve_kind(self, channel: Channel) -> Channel:
        """The channel with its kind known: from config/URL, else from its first response."""
        if channel.kind is not None:
            return channel
        cached = self._probed.get(channel.id)
        if cached is not None:
            return replace(channel, kind=cached)
        kind = await self._probe(channel)
        self._probed[channel.id] = kind
        return replace(channel, kind=kind)

    async def _probe(self, channel: Channel) -> ChannelKind:
        timeout = self._settings.live.probe_timeout
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.open(
                    channel.url, channel.header_map, decompress=False, kind="live"
                )
                async with response:
                    if response.status >= 300:
                        raise UpstreamStatus(response.status)
                    content_type = response.content_type
                    if "mpegurl" in content_type:
                        return "hls"
                    head = await response.first_chunk()
        except TimeoutError:
            raise UpstreamTimeout("the channel source did not answer in time") from None
        if head.lstrip(b"\xef\xbb\xbf \r\n\t").startswith(b"#EXTM3U"):
            return "hls"
        if head[:1] == bytes([_TS_SYNC]) or content_type in ("video/mp2t", "video/mpeg"):
            return "ts"
        raise UpstreamError("the channel source is neither an HLS playlist nor MPEG-TS")


def _read_file(path: Path) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(_MAX_LIST_BYTES + 1)
    if len(data) > _MAX_LIST_BYTES:
        raise OSError(27, "channel list too large")
    return data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, HlsRelayError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
