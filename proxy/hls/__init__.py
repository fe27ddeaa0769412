"""Pure playlist logic: no I/O, no aiohttp. Functions over bytes and strings."""
