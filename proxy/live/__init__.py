"""The FFmpeg pool: TS source reader + fan-out hub, supervised ffmpeg, segment window.

One :class:`~proxy.live.session.LiveSession` per playing channel: one upstream reader feeding
a hub, the hub feeding ffmpeg's stdin and raw-TS viewers, ffmpeg cutting segments into a
window the proxy serves its own playlist from. Never imports :mod:`proxy.channels` or
:mod:`proxy.web`: the web layer hands it a plain :class:`~proxy.live.session.LiveSource`.
"""
