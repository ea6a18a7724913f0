"""Running the storage tools (losetup, mount, btrfs, ...) with uniform errors."""

import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import IO

from sharedsync.core.errors import Internal

#: Generous: a mkfs or a resize on a slow disk; a hung tool must not hang a CSI call forever.
DEFAULT_TIMEOUT_SECONDS = 120.0


class CommandFailed(Internal):
    """A storage tool exited non-zero; carries its stderr for the operator to read."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{argv[0]} failed (exit {returncode}): {self.stderr or 'no output'}")


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str:
    """Run ``argv`` (never through a shell) and return its stdout; raise on failure."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, encoding="utf-8", errors="replace",
            timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise Internal(f"{argv[0]} is not installed (run scripts/setup)") from exc
    except subprocess.TimeoutExpired as exc:
        raise Internal(f"{argv[0]} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr or done.stdout)
    return done.stdout


def _drain(stream: IO[bytes], into: list[bytes]) -> threading.Thread:
    """Read ``stream`` to its end in a thread, so that a chatty tool never blocks on stderr."""
    def read() -> None:
        into.append(stream.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def pipe(producer: Sequence[str], consumer: Sequence[str], *,
         timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Run ``producer | consumer`` and fail if either side fails (no shell, no pipefail gaps).

    When both fail, the error reported is the one that explains the other: a producer killed by
    SIGPIPE only died because the consumer gave up, so the consumer's error is raised then;
    otherwise the producer's (a consumer reading a truncated stream fails because of it).
    """
    try:
        src = subprocess.Popen(list(producer), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise Internal(f"{producer[0]} is not installed (run scripts/setup)") from exc
    with src:
        assert src.stdout is not None
        assert src.stderr is not None
        try:
            dst = subprocess.Popen(list(consumer), stdin=src.stdout, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            src.kill()
            raise Internal(f"{consumer[0]} is not installed (run scripts/setup)") from exc
        with dst:
            src.stdout.close()  # the consumer owns the read end now
            src_err: list[bytes] = []
            reader = _drain(src.stderr, src_err)
            try:
                _, dst_err = dst.communicate(timeout=timeout)
                src.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                src.kill()
                dst.kill()
                raise Internal(f"{producer[0]} | {consumer[0]} did not finish in time") from exc
            reader.join()
    src_text = b"".join(src_err).decode(errors="replace")
    dst_text = dst_err.decode(errors="replace")
    if src.returncode not in (0, -signal.SIGPIPE):
        raise CommandFailed(producer, src.returncode, src_text)
    if dst.returncode != 0:
        raise CommandFailed(consumer, dst.returncode, dst_text)
    if src.returncode != 0:
        raise CommandFailed(producer, src.returncode, src_text)
