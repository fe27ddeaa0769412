"""One typed, frozen Settings object: the TOML config file, overridden by ``HLSRELAY_*`` env.

Every option lives here with its default and unit; ``config/hlsrelay.toml`` documents each one.
Settings are validated once at start-up: a bad file, key or value stops the program with one
line naming it (:class:`ConfigError`, exit code 2 in the CLI). Nothing else reads the
environment or the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from yarl import URL

DEFAULT_CONFIG_PATH = Path("config/hlsrelay.toml")
CONFIG_ENV = "HLSRELAY_CONFIG"
DEFAULT_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line naming the culprit."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: AnyHttpUrl | None = None
    """Absolute URL players reach the proxy at; minted URLs are root-relative when unset."""
    base_path: str = ""
    """Path prefix all routes live under (e.g. "/hls"), for a proxy behind a path-routing edge."""
    shutdown_timeout: float = Field(10.0, ge=0)
    """Seconds in-flight responses may take to finish after SIGTERM."""
    backlog: int = Field(4096, ge=1, le=65535)
    """Connections the kernel holds for hlsrelay to accept (capped by net.core.somaxconn).
    Past it a new connection's handshake is dropped and retried after 1 s, then 3 s: a crowd of
    players arriving while the loop is busy must fit."""
    log_format: Literal["text", "json"] = "text"
    requests_per_turn: int = Field(16, ge=0)
    """Requests handed to the request handler per turn of the event loop, all connections
    together; past it the others wait, in order, for the next turns. 0 = no limit."""
    fast_hits_bytes: int = Field(32 * 1024 * 1024, ge=0)
    """Bytes of cached playlist answers kept for the fast path (answered before aiohttp's request
    machinery, ~5x cheaper a request); bodies are shared with the cache while it holds them.
    0 turns the fast path off."""
    child_uris: Literal["relative", "root"] = "relative"
    """How a rewritten playlist refers to its children: "relative" (``../ref/name``, compact)
    or "root" (``/s/ctx/ref/name``, or absolute under public_url)."""

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("must start with '/'")
        if any(c in value for c in "?#% "):
            raise ValueError("must be a plain path")
        return value


class SecuritySettings(_Section):
    secret: SecretStr | None = None
    """Token key. Unset: read from secret_file, else generated (URLs die with the process)."""
    secret_file: Path | None = None
    """File holding the token key; created with a random key (mode 0600) when missing."""
    api_keys: tuple[SecretStr, ...] = ()
    """Keys that may mint stream URLs (POST /api/v1/streams, /proxy.m3u8). None: minting is off."""
    token_ttl: int = Field(0, ge=0)
    """Seconds a minted stream URL stays valid; 0 = no expiry."""
    token_expiry_bucket: int = Field(300, ge=1)
    """Expiry is rounded up to this many seconds, so tokens stay stable within a bucket."""
    cors_origins: tuple[str, ...] = ("*",)

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class UpstreamSettings(_Section):
    connect_timeout: float = Field(5.0, gt=0)
    """Seconds to open a connection (TCP and TLS) to an upstream."""
    first_byte_timeout: float = Field(10.0, gt=0)
    """Seconds from sending a request to the upstream's response headers."""
    read_timeout: float = Field(15.0, gt=0)
    """Seconds an upstream body may stay silent between two chunks."""
    blocking_reload_timeout: float = Field(30.0, gt=0)
    """First-byte seconds for LL-HLS blocking playlist reloads (_HLS_msn): > 3 target durations."""
    max_redirects: int = Field(5, ge=0, le=30)
    user_agent: str = DEFAULT_USER_AGENT
    """Sent when the stream's header profile sets no User-Agent."""
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Non-global networks that may be reached anyway (e.g. "127.0.0.0/8" for a local engine)."""
    max_playlist_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_connections: int = Field(1000, ge=1)
    """Upstream connections open at once, over all hosts."""
    max_connections_per_host: int = Field(0, ge=0)
    """Upstream connections open at once to one host; 0 = no per-host limit."""
    keepalive_timeout: float = Field(60.0, ge=0)
    """Seconds an idle upstream connection is kept for the next request (nginx's upstream
    ``keepalive_timeout`` default; aiohttp's own is 15 s). 0 = never reused."""
    receive_budget_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """Bytes that upstream bodies being relayed may buffer while they arrive, all together (this
    process's read buffers and the kernel's receive buffers): with N at once, each gets 1/N, at
    least 64 KiB; 512 KiB or more each changes nothing. 0 = no budget (the defaults always).
    See :mod:`proxy.upstream.receive`."""
    receive_turn_ms: float = Field(8.0, ge=0)
    """Milliseconds of CPU time the upstream body reads of one event-loop turn may use, all
    connections together, before the turn's further reads take at most 64 KiB each (the next
    turn reads in full again). 0 = no limit."""

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)
        return value


PROXY_SCHEMES = ("http", "https", "socks4", "socks5")
_PROXY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


def mask_proxy_url(url: str) -> str:
    """``url`` with any user name and password replaced by ``****`` (for output and errors)."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<invalid URL>"
    if parsed.raw_user is None and parsed.raw_password is None:
        return str(parsed)
    host = parsed.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parsed.explicit_port}" if parsed.explicit_port is not None else ""
    return f"{parsed.scheme}://****:****@{host}{port}"


class OutboundProxySettings(_Section):
    """One outbound proxy: a short name (logs, metrics) and its URL (credentials stay secret)."""

    # A validation error must not echo the URL: it may carry a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    url: SecretStr

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"url": value}
        if isinstance(value, dict) and "url" in value:
            raw = value["url"]
            text = raw.get_secret_value() if isinstance(raw, SecretStr) else str(raw)
            # Error messages must never echo the URL: it may hold a password.
            try:
                parsed = URL(text)
            except ValueError:
                raise ValueError("url: not a valid URL") from None
            if parsed.scheme not in PROXY_SCHEMES:
                raise ValueError(f"url: scheme must be one of {', '.join(PROXY_SCHEMES)}")
            if not parsed.raw_host or parsed.explicit_port is None:
                raise ValueError("url: needs a host and an explicit port")
            if parsed.raw_path not in ("", "/") or parsed.raw_query_string:
                raise ValueError("url: must not have a path or query")
            if "name" not in value:
                # Derived from what is not secret: scheme, host, port.
                host = re.sub(r"[^A-Za-z0-9_.-]", "-", parsed.raw_host.strip("[]"))
                value = {**value, "name": f"{parsed.scheme}-{host}-{parsed.explicit_port}"[:40]}
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PROXY_NAME.match(value) or value in ("pool", "direct"):
            raise ValueError("must be 1-40 of A-Z a-z 0-9 _ . - and not 'pool' or 'direct'")
        return value

    @property
    def masked_url(self) -> str:
        return mask_proxy_url(self.url.get_secret_value())


class ProxyRule(_Section):
    """Route upstream hosts matching ``match`` (shell pattern, case-insensitive) ``via`` a
    proxy name, the whole ``pool``, or ``direct``."""

    match: str = Field(min_length=1)
    via: str = "pool"


class ProxiesSettings(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    urls: tuple[OutboundProxySettings, ...] = ()
    """Outbound proxies; empty: every upstream request goes direct."""
    strategy: Literal["round_robin", "random", "least_connections"] = "round_robin"
    sticky: bool = True
    """Every request of one stream goes through the same proxy while it is healthy."""
    rules: tuple[ProxyRule, ...] = ()
    """First matching rule wins; hosts no rule matches go through the pool."""
    failure_threshold: int = Field(3, ge=1, le=100)
    """Failures in a row (connect error, reset, timeout, 407) that eject a proxy."""
    cooldown: float = Field(30.0, gt=0)
    """Seconds an ejected proxy stays out; doubles on each ejection in a row."""
    max_cooldown: float = Field(600.0, gt=0)
    """Upper bound, in seconds, of the growing cooldown."""
    probe_url: AnyHttpUrl | None = None
    """Fetched through an ejected proxy once its cooldown is over: it returns when this works.
    Unset: the proxy returns after its cooldown on trial (one more failure ejects it again)."""
    probe_interval: float = Field(5.0, gt=0)
    """Seconds between two probe rounds."""
    probe_timeout: float = Field(5.0, gt=0)
    when_all_down: Literal["fail", "direct"] = "fail"
    """No proxy available: "fail" answers 503 with Retry-After, "direct" goes without a proxy."""
    retry_attempts: int = Field(3, ge=1, le=10)
    """Attempts (the first included) of a GET that fails before any byte reached the viewer."""
    retry_deadline: float = Field(20.0, gt=0)
    """Seconds all attempts of one request may take together."""
    retry_backoff: float = Field(0.05, ge=0)
    """Base of the jittered exponential backoff between attempts, in seconds."""
    breaker_failure_threshold: int = Field(10, ge=0)
    """Failures in a row that open the circuit of one upstream host; 0 = no breaker."""
    breaker_cooldown: float = Field(30.0, gt=0)
    """Seconds an open circuit fails fast before one trial request is let through."""
    user_agents: tuple[str, ...] = ()
    """User-Agents to rotate, one chosen per stream (sticky) unless the stream sets its own."""

    @model_validator(mode="after")
    def _consistent(self) -> ProxiesSettings:
        names = [p.name for p in self.urls]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"urls: duplicate proxy name {duplicates[0]!r}")
        for rule in self.rules:
            if rule.via not in ("pool", "direct", *names):
                raise ValueError(f"rules: via {rule.via!r} is not 'pool', 'direct' or a proxy name")
            if rule.via == "pool" and not names:
                raise ValueError("rules: via 'pool' but no proxy urls are configured")
        if self.max_cooldown < self.cooldown:
            raise ValueError("max_cooldown: must not be below cooldown")
        return self


class CacheSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    """Where cached playlists and small media objects live: this process, or a shared Redis."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis server for backend = "redis" (``redis://[:password@]host:port/db``)."""
    redis_timeout: float = Field(0.5, gt=0)
    """Seconds one Redis command may take; past it the lookup counts as a miss."""
    memory_bytes: int = Field(256 * 1024 * 1024, ge=0)
    """Byte budget of the in-memory store; least recently used entries go first. 0 = no cache."""
    max_object_bytes: int = Field(8 * 1024 * 1024, ge=0)
    """Largest media object kept in the cache (and buffered whole for followers)."""
    inflight_bytes: int = Field(16 * 1024 * 1024, ge=0)
    """Bytes that media bodies still arriving may hold together, kept whole to be stored and
    shared with late joiners; past it a new chunk's body is only streamed through (small window,
    not stored). Bounds memory with many slow viewers on different segments."""
    inflight_turn_chunks: int = Field(128, ge=0)
    """Chunks the media bodies in flight may take from their upstreams in one turn of the event
    loop, all together; past it the rest wait for the next turn, so hundreds of bodies relayed
    at once never hold up other requests. A chunk counts once per 128 KiB it holds (started);
    a viewer of a crowd let go after its first bytes counts one. 0 = no limit."""
    inflight_turn_ms: float = Field(8.0, ge=0)
    """Milliseconds of CPU time a turn of the event loop may have used since the first of those
    chunks before the rest wait for the next turn, however few were taken (a turn's chunks cost
    what the sockets and the garbage collector make them cost). 0 = counted in chunks only;
    with ``inflight_turn_chunks`` 0 nothing limits a turn."""
    media_ttl: float = Field(300.0, ge=0)
    """Seconds a segment, part or init section stays in the store; 0 = media is not stored."""
    key_ttl: float = Field(30.0, ge=0)
    """Seconds an encryption key stays in the store (never in shared caches); 0 = not stored."""
    stale_if_error: float = Field(30.0, ge=0)
    """Seconds past freshness a playlist may be served when the upstream fails; 0 = never."""
    prefetch_segments: int = Field(0, ge=0, le=10)
    """On a live playlist refresh, fetch this many of the newest segments ahead; 0 = off."""
    vod_max_age: int = Field(86400, ge=1)
    """Cache-Control max-age (seconds) of VOD / ENDLIST playlists."""
    multivariant_max_age: int = Field(60, ge=1)
    """Cache-Control max-age (seconds) of multivariant playlists."""
    media_max_age: int = Field(31536000, ge=1)
    """Cache-Control max-age (seconds) of segments, parts and init sections (immutable)."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value


_INSTANCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def _default_instance_name() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:50] or "hlsrelay"
    return f"{host}-{os.getpid()}"


class LiveSettings(_Section):
    ffmpeg: str = "auto"
    """ffmpeg binary: "auto" = ffmpeg on PATH, else the one bundled by imageio-ffmpeg."""
    segment_seconds: float = Field(2.0, ge=0.5, le=20)
    """Target length of a live HLS segment (cut at the next keyframe, as ffmpeg copies)."""
    window_segments: int = Field(6, ge=3, le=60)
    """Segments listed in a live playlist (and kept in memory per session)."""
    max_sessions: int = Field(10, ge=1, le=1000)
    """Live sessions (one upstream reader + one ffmpeg each) at once; beyond: 503."""
    idle_timeout: float = Field(20.0, ge=0)
    """Seconds a session lives on after its last viewer (zapping back costs nothing)."""
    start_timeout: float = Field(15.0, gt=0)
    """Seconds the first playlist request waits for the first segment."""
    audio: Literal["auto", "copy", "aac"] = "auto"
    """Audio in the HLS window: "copy", "aac" (re-encode), or "auto" (copy AAC and MP3,
    re-encode what browsers cannot play: MP2, AC-3…)."""
    acestream_engine: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:6878")
    """AceStream engine that acestream:// and bare 40-hex channel ids play through."""
    restart_max_backoff: float = Field(30.0, ge=0.1)
    """Upper bound, in seconds, of the delay between two source reconnects or ffmpeg restarts."""
    viewer_buffer_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    """Bytes a raw-TS viewer may fall behind before it is dropped (it never stalls the others)."""
    probe_timeout: float = Field(5.0, gt=0)
    """Seconds to look at a channel whose kind (hls or ts) neither config nor URL tells."""
    instance_name: str = Field(default_factory=_default_instance_name, pattern=_INSTANCE_NAME)
    """Names this instance in live-channel leases and logs (default: host name and process id)."""
    lease_ttl: float = Field(10.0, ge=3, le=300)
    """Seconds a live-channel lease outlives its last renewal (renewed every second while the
    channel plays): how long a dead instance's channels wait before another one takes them.
    Leases live in cache.redis_url when cache.backend = "redis"; otherwise they are local."""


_SOURCE_SCHEMES = ("http://", "https://", "acestream://", "lavfi:")
_CHANNEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$"


class ChannelSettings(_Section):
    id: str = Field(pattern=_CHANNEL_ID)
    name: str = ""
    url: str = Field(min_length=1)
    """http(s) URL, acestream://HASH, a bare 40-hex AceStream id, or lavfi:GRAPH (test pattern)."""
    headers: dict[str, str] = Field(default_factory=dict)
    kind: Literal["hls", "ts"] | None = None
    backup_urls: tuple[str, ...] = ()
    logo: str = ""
    group: str = ""

    @field_validator("url", "backup_urls")
    @classmethod
    def _source_url(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for url in (value,) if isinstance(value, str) else value:
            text = url.strip()
            hex_id = len(text) == 40 and all(c in "0123456789abcdefABCDEF" for c in text)
            if not (text.startswith(_SOURCE_SCHEMES) or hex_id):
                raise ValueError(
                    "must be an http(s) URL, acestream://HASH, a 40-hex id or lavfi:GRAPH"
                )
        return value


class ChannelListSettings(_Section):
    path: Path | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    refresh_interval: float = Field(3600.0, ge=0)
    """Seconds between two reloads of the list; 0 = load once at start."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http or https URL")
        return value

    def model_post_init(self, __context: Any) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError("set exactly one of 'path' or 'url'")


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="HLSRELAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    server: ServerSettings = ServerSettings()
    security: SecuritySettings = SecuritySettings()
    upstream: UpstreamSettings = UpstreamSettings()
    proxies: ProxiesSettings = ProxiesSettings()
    cache: CacheSettings = CacheSettings()
    live: LiveSettings = LiveSettings()
    channels: tuple[ChannelSettings, ...] = ()
    channel_lists: tuple[ChannelListSettings, ...] = ()

    @field_validator("channels")
    @classmethod
    def _unique_ids(cls, value: tuple[ChannelSettings, ...]) -> tuple[ChannelSettings, ...]:
        seen: set[str] = set()
        for channel in value:
            if channel.id in seen:
                raise ValueError(f"duplicate channel id {channel.id!r}")
            seen.add(channel.id)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file arrives as init kwargs; the environment overrides it, key by key.
        return (env_settings, init_settings)


def config_path(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """The config file to read and whether it was asked for (then it must exist)."""
    if explicit:
        return Path(explicit), True
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the configuration; raise :class:`ConfigError` on any fault.

    ``overrides`` are whole sections (``server={"port": 0}``) laid over the file, for tests and
    the CLI; the environment still wins over both.
    """
    file, required = config_path(path)
    data: dict[str, Any] = {}
    if file.exists():
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: {exc.strerror}") from None
    elif required:
        raise ConfigError(f"{file}: no such config file")
    for section, values in overrides.items():
        merged = dict(data.get(section, {}))
        merged.update(values)
        data[section] = merged
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, file)) from None


def _one_line(exc: ValidationError, file: Path) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "config"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{file}: {where}: {message}{more}"


def token_secret(settings: Settings) -> tuple[bytes, str]:
    """The token key and where it came from: "config", "file" or "generated".

    A generated key is written to ``security.secret_file`` when one is set, so ``hlsrelay sign``
    and the server agree; otherwise it lives only as long as the process.
    """
    sec = settings.security
    if sec.secret is not None:
        return sec.secret.get_secret_value().encode(), "config"
    if sec.secret_file is not None:
        try:
            text = sec.secret_file.read_text().strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise ConfigError(f"security.secret_file: {sec.secret_file}: {exc.strerror}") from None
        if text:
            if len(text) < 16:
                raise ConfigError(f"security.secret_file: {sec.secret_file}: key shorter than 16")
            return text.encode(), "file"
        generated = secrets.token_urlsafe(32)
        try:
            sec.secret_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(sec.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(generated + "\n")
        except FileExistsError:  # another process won the race: use its key
            return sec.secret_file.read_text().strip().encode(), "file"
        except OSError as exc:
            raise ConfigError(f"security.secret_file: {sec.secret_file}: {exc.strerror}") from None
        return generated.encode(), "generated"
    return secrets.token_urlsafe(32).encode(), "generated"


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret masked (for check-config)."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    security = data["security"]
    security["secret"] = "********" if settings.security.secret is not None else None
    security["api_keys"] = ["********" for _ in settings.security.api_keys]
    data["proxies"]["urls"] = [{"name": p.name, "url": p.masked_url} for p in settings.proxies.urls]
    data["cache"]["redis_url"] = _mask_url_password(settings.cache.redis_url)
    # Channel sources often carry credentials: header values (cookies, tokens) and query
    # strings (Xtream username/password) are masked.
    for entry in [*data["channels"], *data["channel_lists"]]:
        entry["headers"] = dict.fromkeys(entry.get("headers") or {}, "********")
        if entry.get("url"):
            entry["url"] = _mask_url(entry["url"])
        if "backup_urls" in entry:
            entry["backup_urls"] = [_mask_url(u) for u in entry["backup_urls"]]
    return data


def _mask_url_password(url: str) -> str:
    """``url`` with whatever sits before ``@`` (user, password) masked."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}{sep}{user}:********@{hostpart}"


def _mask_url(url: str) -> str:
    base, sep, _query = url.partition("?")
    scheme, has_scheme, rest = base.partition("://")
    if has_scheme and "@" in rest.split("/", 1)[0]:
        rest = "********@" + rest.split("@", 1)[1]
        base = f"{scheme}://{rest}"
    return base + ("?********" if sep else "")
