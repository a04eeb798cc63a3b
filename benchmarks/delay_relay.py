"""A TCP relay that puts its target an RTT away: the "upstream 50 ms away".

    python benchmarks/delay_relay.py --listen PORT --target HOST:PORT --rtt-ms 50

A latency line, not a bandwidth limit: every chunk read from one side is
written to the other rtt/2 after it arrived (in order, without holding up the
chunks behind it), in both directions, so a request and its answer cost one
RTT more than on loopback, and a long body streams at loopback speed once its
first byte has crossed. A new connection costs one more RTT before anything
crosses (the TCP handshake to a far host). So a request on a fresh upstream
connection pays 2 x RTT, one on a kept-alive connection 1 x RTT, like a real
registry 25 ms away each way.

asyncio, one process, standard library only; the benchmark runs it as its own
process so its CPU is neither the proxy's nor the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while True:
                data = await src.read(256 * 1024)
                queue.put_nowait((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            queue.put_nowait((loop.time(), b""))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            dst.write(data)
            await dst.drain()

    reader = asyncio.create_task(read())
    try:
        await write()
    except (ConnectionError, OSError):
        pass
    finally:
        reader.cancel()


async def _handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                  host: str, port: int, rtt: float) -> None:
    try:
        await asyncio.sleep(rtt)  # the handshake with a host rtt away
        up_r, up_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, up_w, rtt / 2), _pump(up_r, client_w, rtt / 2))
    finally:
        for w in (up_w, client_w):
            with contextlib.suppress(OSError):
                w.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    p.add_argument("--target", required=True, help="HOST:PORT to relay to")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    a = p.parse_args()
    host, _, port = a.target.rpartition(":")
    rtt = a.rtt_ms / 1000
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, host, int(port), rtt), "127.0.0.1", a.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
