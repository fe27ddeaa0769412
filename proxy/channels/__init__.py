"""M3U channel lists: parse, emit, AceStream and Xtream URL forms; the channel catalog.

Never imports :mod:`proxy.live` or :mod:`proxy.web`: the HTTP surface joins channels and
live sessions.
"""
