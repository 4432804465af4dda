"""proxy: the delaying TCP proxy in front of the origin, and the origin-side byte counter.

Runs inside the origin's network namespace. Every connection accepted on LISTEN is forwarded to
UPSTREAM. Whenever the client has sent bytes (a new request) and the server then starts to answer,
the first answering chunk is held back DELAY seconds: each request pays one first-byte latency,
as it would against a remote S3 endpoint, whether or not the connection is reused. Bytes in both
directions are counted and written as JSON to STATS (atomically, every 200 ms and at exit), so
the orchestrator reads the origin's traffic from outside without asking this process anything.

Not a general proxy: no HTTP parsing, no pipelining awareness (S3 clients do not pipeline).
"""

import asyncio
import json
import os
import signal
import sys

BUF = 256 * 1024


class Counters:
    def __init__(self):
        self.down = 0  # origin -> clients: what the origin link carries
        self.up = 0  # clients -> origin
        self.connections = 0
        self.answers = 0  # delayed first bytes, i.e. requests answered

    def as_dict(self):
        return {
            "bytes_down": self.down,
            "bytes_up": self.up,
            "connections": self.connections,
            "answers": self.answers,
        }


async def pump_up(reader, writer, c, pending):
    """Client -> origin. The client's end of stream is passed on; a reset closes the origin side,
    which ends `pump_down` too."""
    try:
        while True:
            data = await reader.read(BUF)
            if not data:
                break
            c.up += len(data)
            pending.set()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def pump_down(reader, writer, c, pending, delay):
    while True:
        data = await reader.read(BUF)
        if not data:
            break
        if pending.is_set():
            pending.clear()
            c.answers += 1
            await asyncio.sleep(delay)
        c.down += len(data)
        writer.write(data)
        await writer.drain()


async def handle(client_r, client_w, upstream, delay, c):
    c.connections += 1
    host, port = upstream
    try:
        server_r, server_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    pending = asyncio.Event()
    up = asyncio.create_task(pump_up(client_r, server_w, c, pending))
    try:
        # Ends when the origin closes the connection, or the client is gone.
        await pump_down(server_r, client_w, c, pending, delay)
    except OSError:
        pass
    finally:
        up.cancel()
        for w in (server_w, client_w):
            w.close()


def write_stats(path, c):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(c.as_dict(), f)
    os.replace(tmp, path)


async def main(listen, upstream, delay, stats):
    c = Counters()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream, delay, c), listen[0], listen[1], limit=BUF
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        while not stop.is_set():
            write_stats(stats, c)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
    write_stats(stats, c)


def split_addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: proxy.py LISTEN UPSTREAM DELAY_MS STATS_FILE")
    asyncio.run(
        main(
            split_addr(sys.argv[1]),
            split_addr(sys.argv[2]),
            float(sys.argv[3]) / 1000.0,
            sys.argv[4],
        )
    )
