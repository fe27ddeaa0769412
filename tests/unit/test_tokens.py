"""Tokens: deterministic, authenticated, encrypted, compact, bound to their context."""

from __future__ import annotations

import base64
import gc

import pytest

from proxy.errors import BadSignature, InvalidHeader, MalformedToken, TokenExpired
from proxy.hls.kinds import UriKind
from proxy.tokens import TokenCodec, display_name, normalize_headers, url_base

SECRET = b"unit-test-secret-0123456789"
URL = "https://cdn.example.com/vod/abc/master.m3u8?sig=s3cr3t"
HEADERS = {"Referer": "https://site.example/watch", "Cookie": "session=viewer-cookie"}


def codec(**kw: int) -> TokenCodec:
    return TokenCodec(SECRET, **kw)


def test_same_input_gives_same_tokens_across_codecs() -> None:
    a, b = codec(), codec()
    ctx_a, ctx_b = a.mint_context(URL, HEADERS), b.mint_context(URL, HEADERS)
    assert ctx_a == ctx_b
    ca, cb = a.open_context(ctx_a), b.open_context(ctx_b)
    assert a.child_path(ctx_a, ca, URL, UriKind.PLAYLIST) == b.child_path(
        ctx_b, cb, URL, UriKind.PLAYLIST
    )


def test_header_order_and_case_duplicates_do_not_change_the_context() -> None:
    c = codec()
    one = c.mint_context(URL, {"Referer": "r", "Origin": "o"})
    two = c.mint_context(URL, [("Origin", "o"), ("Referer", "r")])
    assert one == two


def test_round_trip_context_and_ref() -> None:
    c = codec()
    token = c.mint_context(URL, HEADERS)
    ctx = c.open_context(token)
    assert ctx.base == "https://cdn.example.com/vod/abc/"
    assert dict(ctx.headers) == HEADERS
    for url, kind in [
        ("https://cdn.example.com/vod/abc/720p/seg_1.ts?x=%2F", UriKind.MEDIA),
        ("https://keys.example.net/k/1?token=a%20b", UriKind.KEY),
        ("http://other.example/init.mp4", UriKind.INIT),
    ]:
        ref_token = c.mint_ref(token, ctx, url, kind)
        ref = c.open_ref(token, ctx, ref_token)
        assert (ref.url, ref.kind) == (url, kind)


def test_imports_travel_in_the_ref() -> None:
    c = codec()
    token = c.mint_context(URL, {})
    ctx = c.open_context(token)
    ref = c.open_ref(
        token, ctx, c.mint_ref(token, ctx, URL, UriKind.PLAYLIST, {"host": "a.example"})
    )
    assert dict(ref.imports) == {"host": "a.example"}


def test_nothing_readable_in_tokens() -> None:
    c = codec()
    token = c.mint_context(URL, HEADERS)
    path = c.child_path(token, c.open_context(token), URL, UriKind.PLAYLIST)
    for secret_part in ("cdn.example.com", "s3cr3t", "viewer-cookie", "site.example"):
        assert secret_part not in token and secret_part not in path
        decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert secret_part.encode() not in decoded


def test_tampered_token_is_a_bad_signature() -> None:
    c = codec()
    token = c.mint_context(URL, HEADERS)
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    with pytest.raises(BadSignature):
        c.open_context(flipped)


def test_other_secret_is_a_bad_signature() -> None:
    token = codec().mint_context(URL, HEADERS)
    with pytest.raises(BadSignature):
        TokenCodec(b"another-secret-0123456789").open_context(token)


@pytest.mark.parametrize(
    "garbage", ["", "abc", "!!!!!!!!!!!!!!!!!!!!!!!!!!!!", "a" * 20000, "é" * 30]
)
def test_garbage_is_malformed(garbage: str) -> None:
    with pytest.raises(MalformedToken):
        codec().open_context(garbage)


def test_ref_only_opens_under_its_own_context() -> None:
    c = codec()
    mine = c.mint_context(URL, {"Cookie": "mine"})
    theirs = c.mint_context(URL, {"Cookie": "theirs"})
    my_ctx, their_ctx = c.open_context(mine), c.open_context(theirs)
    ref = c.mint_ref(mine, my_ctx, URL, UriKind.MEDIA)
    with pytest.raises(BadSignature):
        c.open_ref(theirs, their_ctx, ref)


def test_a_ref_is_not_a_context() -> None:
    c = codec()
    token = c.mint_context(URL, {})
    ref = c.mint_ref(token, c.open_context(token), URL, UriKind.MEDIA)
    with pytest.raises(BadSignature):
        c.open_context(ref)


def test_expiry_is_bucketed_and_enforced() -> None:
    c = codec(ttl_seconds=600, expiry_bucket_seconds=300)
    now = 1_000_000.0
    token = c.mint_context(URL, {}, now=now)
    # Stable within a bucket: another mint a few seconds later is the same token.
    assert c.mint_context(URL, {}, now=now + 10) == token
    ctx = c.open_context(token, now=now + 500)
    assert ctx.expires is not None and ctx.expires >= now + 600
    assert ctx.expires % 300 == 0
    with pytest.raises(TokenExpired):
        c.open_context(token, now=ctx.expires + 1)


def test_suffix_form_keeps_refs_short() -> None:
    c = codec()
    token = c.mint_context(URL, HEADERS)
    ctx = c.open_context(token)
    child = c.child_path(token, ctx, "https://cdn.example.com/vod/abc/seg_00001.ts", UriKind.MEDIA)
    ref, name = child.split("/")
    assert name == "seg_00001.ts"
    assert len(ref) <= 48


def test_child_path_is_memoised_and_stable() -> None:
    c = codec()
    token = c.mint_context(URL, {})
    ctx = c.open_context(token)
    first = c.child_path(token, ctx, URL, UriKind.MEDIA)
    assert c.child_path(token, ctx, URL, UriKind.MEDIA) is first
    assert codec().child_path(token, ctx, URL, UriKind.MEDIA) == first


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Referer": "a\r\nX-Evil: 1"}, "CR"),
        ({"User-Agent": "a\nb"}, "CR"),
        ({"Bad Name": "x"}, "name"),
        ({"Host": "evil.example"}, "set by the proxy"),
        ({"Content-Length": "1"}, "set by the proxy"),
    ],
)
def test_header_profile_validation(headers: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidHeader, match=message):
        normalize_headers(headers)


def test_url_base_and_display_name() -> None:
    assert url_base("https://h.example/a/b/c.m3u8?x=/y/z") == "https://h.example/a/b/"
    assert url_base("https://h.example") == "https://h.example/"
    assert url_base("https://h.example?q=1") == "https://h.example/"
    assert display_name("https://h.example/a/seg%201.ts?x=1", UriKind.MEDIA) == "seg_201.ts"
    assert display_name("https://h.example/", UriKind.PLAYLIST) == "index.m3u8"
    assert display_name("https://h.example/get.php?a=1", UriKind.MEDIA) == "get.php"
    assert display_name("https://h.example/..", UriKind.KEY) == "file.key"


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TokenCodec(b"short")


def test_full_caches_evict_the_older_half_and_keep_working() -> None:
    c = TokenCodec(SECRET, cache_entries=100)
    token = c.mint_context(URL, {})
    ctx = c.open_context(token)
    paths = [
        c.child_path(token, ctx, f"https://cdn.example.com/vod/abc/s{i}.ts", UriKind.MEDIA)
        for i in range(1000)
    ]
    assert len(c._child_cache) <= 100
    # Evicted or not, a URI maps to the same path, and every ref still opens.
    again = c.child_path(token, ctx, "https://cdn.example.com/vod/abc/s0.ts", UriKind.MEDIA)
    assert again == paths[0]
    for i in (0, 500, 999):
        ref = c.open_ref(token, ctx, paths[i].split("/")[0])
        assert ref.url == f"https://cdn.example.com/vod/abc/s{i}.ts"
    assert len(c._ref_cache) <= 100


BATCH_URLS = [
    "https://cdn.example.com/vod/abc/seg_00001.ts",  # beside the playlist: the suffix form
    "https://cdn.example.com/vod/abc/720p/seg_00002.ts",  # under the base, deeper
    "https://cdn.example.com/vod/abc/seg_00003.ts?token=0f3a&expires=1767225600",
    "https://other.example.net/x/seg_00004.ts?sig=abc",  # not under the base
    "https://cdn.example.com/vod/abc/seg%205.ts",  # a name that must be cleaned
    "https://cdn.example.com/vod/abc/",  # no name at all
    "https://cdn.example.com/vod/abc/a.ts#frag?x",  # '#' before '?'
    "https://cdn.example.com/vod/abc/\u00e9t\u00e9.ts",  # non-ASCII
    "https://cdn.example.com/vod/abc/raw\udcff.ts",  # a byte that was not UTF-8
    "https://cdn.example.com/vod/abc/seg_00001.ts",  # a repeat
    "https://cdn.example.com/vod/abc/" + "n" * 80 + ".ts",  # a name too long to keep
]


@pytest.mark.parametrize("kind", list(UriKind))
@pytest.mark.parametrize(
    "urls",
    [
        BATCH_URLS,
        [u for u in BATCH_URLS if u.startswith("https://cdn.example.com/vod/abc/")],
        [f"https://cdn.example.com/vod/abc/seg_{n:05d}.ts" for n in range(50)],
        [f"https://other.example.net/x/seg_{n:05d}.ts?sig={n}" for n in range(50)],
        ["https://cdn.example.com/vod/abc/line\nbreak.ts", *BATCH_URLS[:3]],
        [],
    ],
    ids=["mixed", "all-under-base", "plain-names", "all-elsewhere", "newline", "empty"],
)
def test_child_paths_give_exactly_what_child_path_gives(urls: list[str], kind: UriKind) -> None:
    one, many = codec(), codec()
    token = one.mint_context(URL, HEADERS)
    expected = [one.child_path(token, one.open_context(token), url, kind) for url in urls]
    ctx = many.open_context(token)
    assert many.child_paths(token, ctx, urls, kind) == expected
    # Memoised: the single-URL path now finds what the batch minted, and vice versa.
    for url, path in zip(urls, expected, strict=True):
        assert many.child_path(token, ctx, url, kind) == path
        assert many.open_ref(token, ctx, path.split("/")[0]).url == url
    assert one.child_paths(token, one.open_context(token), urls, kind) == expected
    # Not memoised (the relay's line memo remembers them): the same paths all the same.
    assert codec().child_paths(token, ctx, urls, kind, memoise=False) == expected


def test_child_paths_mint_only_what_is_missing() -> None:
    c = codec()
    token = c.mint_context(URL, HEADERS)
    ctx = c.open_context(token)
    first = c.child_path(token, ctx, BATCH_URLS[2], UriKind.MEDIA)
    paths = c.child_paths(token, ctx, BATCH_URLS[:4], UriKind.MEDIA)
    assert paths[2] is first  # taken from the cache, not minted again
    assert paths == [codec().child_path(token, ctx, u, UriKind.MEDIA) for u in BATCH_URLS[:4]]


def test_child_paths_keep_the_cache_bounded() -> None:
    c = TokenCodec(SECRET, cache_entries=100)
    token = c.mint_context(URL, {})
    ctx = c.open_context(token)
    urls = [f"https://cdn.example.com/vod/abc/s{i}.ts" for i in range(90)]
    c.child_paths(token, ctx, urls, UriKind.MEDIA)
    c.child_paths(token, ctx, [u + "?again" for u in urls], UriKind.MEDIA)
    assert len(c._child_cache) <= 100
    big = [f"https://cdn.example.com/vod/abc/big{i}.ts" for i in range(150)]
    paths = c.child_paths(token, ctx, big, UriKind.MEDIA)
    assert len(c._child_cache) <= 100
    assert paths == [codec().child_path(token, ctx, u, UriKind.MEDIA) for u in big]


def test_memoised_refs_and_paths_cost_the_garbage_collector_nothing() -> None:
    """Every full collection walks every tracked object: caches of 100,000 entries must hold
    only what the collector stops tracking (strings, ints, tuples and dicts of them)."""
    c = codec()
    token = c.mint_context(URL, {})
    ctx = c.open_context(token)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2000):
        path = c.child_path(token, ctx, f"https://cdn.example.com/vod/abc/s{i}.ts", UriKind.MEDIA)
        ref = c.open_ref(token, ctx, path.split("/")[0])
        assert c.open_ref(token, ctx, path.split("/")[0]) == ref  # a hit gives the same ref
    del path, ref
    gc.collect()
    gc.collect()  # a container is untracked once what it holds was (the collection after)
    assert len(gc.get_objects()) - before < 50
    assert len(c._child_cache) == len(c._ref_cache) == 2000
