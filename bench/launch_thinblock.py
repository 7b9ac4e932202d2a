"""A tiny thinblock server for the benchmark, without the daemon or the CLI: the engine API
and the NBD server in one process.

    python -m bench.launch_thinblock --data DIR --pd-dir DIR --port PORT --raid 0

creates two sparse file PDs, one pool (set size 2) and one VV, serves it over NBD on
127.0.0.1:PORT, prints ``READY`` and runs until SIGTERM or SIGINT, then closes the engine.
``--cprofile FILE`` writes a cProfile of the whole serving time (for the data-path profile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import signal
import sys
from pathlib import Path
from typing import Any

from thinblock.memory import warm_heap

HOST = "127.0.0.1"


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


async def serve(args: argparse.Namespace) -> None:
    from thinblock.engine import Engine, EngineOptions
    from thinblock.model import CacheMode
    from thinblock.nbd.server import NBDServer

    engine = await Engine.open(args.data, EngineOptions(pd_direct_io=args.direct_io))
    try:
        pd_dir = Path(args.pd_dir)
        for index in range(2):
            await engine.add_pd(
                pd_dir / f"pd{index}.img", size=args.pd_size, chunklet_size=args.chunklet_size
            )
        await engine.create_pool("bench", raid=args.raid, set_size=2)
        await engine.create_vv(args.export, pool="bench", size=args.vv_size, cache_mode=CacheMode(args.cache))
        server = NBDServer(engine, default_export=args.export)
        await server.start(HOST, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("READY", flush=True)
        await stop.wait()
        for name in ("close", "stop", "aclose"):
            method = getattr(server, name, None)
            if method is not None:
                await _maybe_await(method())
                break
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_thinblock", description=__doc__)
    parser.add_argument("--data", required=True, help="data directory (created)")
    parser.add_argument("--pd-dir", required=True, help="where the two PD files are created")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--raid", type=int, default=1)
    parser.add_argument("--pd-size", type=int, default=16 * 2**30)
    parser.add_argument("--vv-size", type=int, default=16 * 2**30)
    parser.add_argument("--chunklet-size", type=int, default=256 * 2**20)
    parser.add_argument("--export", default="vol")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--cache", choices=("writethrough", "writeback"), default="writethrough")
    parser.add_argument("--direct-io", action="store_true", help="open the PDs for direct I/O")
    parser.add_argument("--cprofile", help="write a cProfile of the serving process to this file")
    args = parser.parse_args(argv)

    warm_heap()  # as the daemon does
    run: Any = asyncio.run
    if args.loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            run = uvloop.run
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run(serve(args))
        finally:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
    else:
        run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
