"""``python -m tests.bench``: run every benchmark, print a Markdown report, save it.

The report goes to stdout and to ``tests/bench/RESULTS.md`` (``--output`` to change,
``--no-write`` to skip); the side-by-side target ratios (hlsrelay against nginx and
mediaflow-proxy, ``bench_peers``) also replace the marked block in README's Performance section.
Figures are medians over rounds, with the smallest and largest round.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.bench import bench_peers
from tests.bench.bench_core import (
    CONCURRENT_FETCHES,
    MAX_RELAY_ROUNDS,
    SEGMENT_BYTES,
    SEGMENTS,
    SEQUENTIAL_FETCHES,
    RelayFigure,
    RewriteFigure,
    SizeFigure,
    bench_relay,
    bench_rewrite,
    machine,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
README = Path(__file__).resolve().parents[2] / "README.md"
PEERS_START = "<!-- bench_peers:start (written by make bench) -->"
PEERS_END = "<!-- bench_peers:end -->"
PEERS_HEADING = "### Side by side with nginx and mediaflow-proxy (`make bench`)"
COLD_TARGET_MS = 10.0
CACHED_TARGET_MS = 2.0
SIZE_TARGET_RATIO = 3.0


def _kib(size: int) -> str:
    return f"{size / 1024:,.1f} KiB"


def _rewrite_table(figures: list[RewriteFigure]) -> list[str]:
    rows = [
        f"## Rewriting a {SEGMENTS:,}-segment live media playlist",
        "",
        "`StreamRelay.rewrite` (the rewriter and the real token mapper, `TokenCodec.child_paths` "
        "for segment lines, "
        "relative child URIs as shipped). Cold: a fresh `TokenCodec`, nothing memoised "
        "(one AES-SIV seal per URI). Cached: the same codec again, as on a live reload. "
        f"Targets: ≤ {COLD_TARGET_MS:g} ms cold, ≤ {CACHED_TARGET_MS:g} ms cached.",
        "",
        "| upstream URI form | URIs | cold | cached | within target |",
        "|---|---:|---|---|---|",
    ]
    for f in figures:
        verdict = (
            f"cold {'yes' if f.cold_ms.median <= COLD_TARGET_MS else '**no**'}, "
            f"cached {'yes' if f.cached_ms.median <= CACHED_TARGET_MS else '**no**'}"
        )
        rows.append(
            f"| {f.form} | {f.uris:,} | {f.cold_ms.show('ms')} | {f.cached_ms.show('ms', 3)} "
            f"| {verdict} |"
        )
    return rows


def _size_table(figures: list[SizeFigure]) -> list[str]:
    rows = [
        "## Rewritten playlist size",
        "",
        "The same playlist, upstream bytes against what a player downloads from hlsrelay "
        f"(aim: ≤ {SIZE_TARGET_RATIO:g}x plain); gzip at level 6.",
        "",
        "| upstream URI form | upstream | rewritten | ratio | upstream gzip | rewritten gzip "
        "| gzip ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        rows.append(
            f"| {f.form} | {_kib(f.upstream)} | {_kib(f.rewritten)} "
            f"| {f.rewritten / f.upstream:.2f}x | {_kib(f.upstream_gz)} | {_kib(f.rewritten_gz)} "
            f"| {f.rewritten_gz / f.upstream_gz:.2f}x |"
        )
    return rows


def _relay_table(figures: list[RelayFigure], rounds: int) -> list[str]:
    rows = [
        f"## Relaying a {SEGMENT_BYTES // 2**20} MiB segment on loopback",
        "",
        "Origin (aiohttp + uvloop, own process) direct, against the same origin through "
        "hlsrelay (`python -m proxy serve`, shipped config, own process; URL from "
        "`python -m proxy sign`). One aiohttp client in the bench process, keep-alive. "
        f"{rounds} recorded rounds after one warm-up, direct and proxied rounds interleaved "
        "(order alternating). Every proxied fetch is a URL not fetched before, so no cache or "
        "request coalescing helps. TTFB: request sent to first body byte (concurrent: from the "
        "common start). Bytes checked against the origin's before timing. The client, the "
        f"origin and hlsrelay share this machine's {os.cpu_count()} CPUs, so on a small machine "
        "the proxied figures include CPU contention with the other two. hlsrelay CPU: its "
        "process's user + system time (from /proc) per MiB relayed, over all recorded "
        "rounds. hlsrelay logs every request, as shipped.",
        "",
        "| pattern | path | throughput | TTFB | hlsrelay CPU per MiB |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "sequential": f"{SEQUENTIAL_FETCHES} sequential",
        "concurrent": f"{CONCURRENT_FETCHES} concurrent",
    }
    by_key = {(f.pattern, f.path): f for f in figures}
    for f in figures:
        cpu = "-" if f.proxy_cpu_ms_per_mib is None else f"{f.proxy_cpu_ms_per_mib:.2f} ms"
        rows.append(
            f"| {labels[f.pattern]} | {f.path} | {f.throughput_mib_s.show('MiB/s', 0)} "
            f"| {f.ttfb_ms.show('ms')} | {cpu} |"
        )
    for pattern, label in labels.items():
        direct, proxied = by_key.get((pattern, "direct")), by_key.get((pattern, "hlsrelay"))
        if direct and proxied:
            rows.append(
                f"| {label} | hlsrelay / direct "
                f"| {proxied.throughput_mib_s.median / direct.throughput_mib_s.median:.2f}x "
                f"| {proxied.ttfb_ms.median / direct.ttfb_ms.median:.2f}x | |"
            )
    return rows


def update_readme(headline: str, readme: Path = README) -> None:
    """Put the side-by-side ratios in README's Performance section, keeping everything else."""
    block = f"{PEERS_START}\n{headline.rstrip()}\n{PEERS_END}"
    text = readme.read_text()
    if PEERS_START in text and PEERS_END in text:
        before, rest = text.split(PEERS_START, 1)
        after = rest.split(PEERS_END, 1)[1]
        text = before + block + after
    else:
        section = f"{PEERS_HEADING}\n\n{block}\n\n"
        if "\n## Performance\n" not in text:
            text = text.rstrip("\n") + "\n\n## Performance\n\n" + section
        else:
            head, tail = text.split("\n## Performance\n", 1)
            # First in the section: after its opening paragraph, before its first subsection.
            cut = tail.find("\n### ")
            cut = len(tail) if cut < 0 else cut + 1
            text = f"{head}\n## Performance\n{tail[:cut]}{section}{tail[cut:]}"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="rewrite rounds (default 15)")
    parser.add_argument(
        "--relay-rounds", type=int, default=25, help="recorded relay rounds per path (default 25)"
    )
    parser.add_argument("--skip-relay", action="store_true", help="only the rewrite benchmarks")
    parser.add_argument("--skip-peers", action="store_true", help="no side-by-side run")
    # Five: on this shared machine one round in three or four can be a slow one for a single
    # contestant (hlsrelay's case 4 moved 19,000-42,000 requests/s between rounds of one run);
    # the median of five stays put with two of them.
    parser.add_argument(
        "--peer-rounds", type=int, default=5, help="side-by-side rounds per case (default 5)"
    )
    parser.add_argument(
        "--peer-seconds", type=int, default=4, help="seconds per wrk run (default 4)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.relay_rounds <= MAX_RELAY_ROUNDS:
        parser.error(f"--rounds must be ≥ 1 and --relay-rounds between 1 and {MAX_RELAY_ROUNDS}")

    began = time.monotonic()
    command = shlex.join([sys.executable, "-m", "tests.bench", *sys.argv[1:]])
    lines = [
        "# hlsrelay benchmarks",
        "",
        f"- command: `{command}` (from the repository root)",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        *(f"- {name}: {value}" for name, value in machine().items()),
        "- figures: median (min-max over rounds, n = rounds); no figure is asserted by tests",
        "",
    ]
    rewrites, sizes = bench_rewrite(args.rounds)
    lines += [*_rewrite_table(rewrites), "", *_size_table(sizes), ""]
    if not args.skip_relay:
        lines += [*_relay_table(bench_relay(args.relay_rounds), args.relay_rounds), ""]
    peers = None
    if not args.skip_peers:
        peers = bench_peers.measure(args.peer_rounds, args.peer_seconds)
        lines += [peers.markdown()]
    lines.append(f"Whole run: {time.monotonic() - began:.0f} s.")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if not args.no_write:
        args.output.write_text(report)
        if peers is not None:
            update_readme(peers.headline())
    return 0


if __name__ == "__main__":
    sys.exit(main())
