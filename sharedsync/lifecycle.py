"""Process lifecycle shared by our servers: run until asked to stop."""

import asyncio
import signal


async def until_terminated() -> None:
    """Return when the process gets SIGTERM (kubelet, systemd) or SIGINT (a person)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
