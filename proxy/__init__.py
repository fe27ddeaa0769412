"""hlsrelay: an asyncio streaming reverse proxy for HLS."""

__version__ = "0.1.0"
