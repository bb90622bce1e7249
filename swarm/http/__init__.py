"""The public HTTP API of a peer (aiohttp) and its listener."""
