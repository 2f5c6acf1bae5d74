"""The peer in the web echo's figures: the ``websockets`` library's own echo server (its documented
``async for message in websocket: await websocket.send(message)``), on asyncio.

    python scripts/peers/websockets_echo.py PORT
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, serve


async def echo(websocket: ServerConnection) -> None:
    async for message in websocket:
        await websocket.send(message)


async def main(port: int) -> None:
    async with serve(echo, "127.0.0.1", port, max_size=2**20, compression=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
