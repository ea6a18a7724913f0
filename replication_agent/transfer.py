"""Moving one snapshot between agents: ``btrfs send`` -> frames -> gRPC -> ``btrfs receive``.

The sender reads ``btrfs send`` (incremental from a parent both sides hold, or full) and turns
it into checksummed frames paced by the volume's bandwidth; the receiver verifies every frame
before a byte of it reaches ``btrfs receive``, and feeds the final bytes (which carry the
stream's END command) only after the whole-stream digest matched. ``btrfs receive`` marks the new
subvolume read-only only when it reads END, so an interrupted or corrupt stream always leaves a
writable leftover that :meth:`Lineage.discard_partial` removes: a replica is never half-applied.

Full streams (a new or rebuilt replica) are also spooled to disk as they arrive, so a transfer
that is cut off resumes from the verified bytes it already has instead of starting over.
"""

import asyncio
import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sharedsync import failpoints
from sharedsync.core.errors import (
    Aborted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from sharedsync.core.framing import (
    DEFAULT_CHUNK_SIZE,
    NEVER_COMPRESS,
    CompressionPolicy,
    CorruptFrame,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameFault,
)
from sharedsync.core.send_stream import StreamRefused, SubvolumeGuard
from sharedsync.storage import btrfs
from sharedsync.storage.files import syncfs

from .lineage import Lineage, SnapRef
from .proto import agent_pb2 as pb
from .push_wire import encode_frame
from .shared_streams import Recorder
from .spool import Spool, SpoolWriter

READ_SIZE = DEFAULT_CHUNK_SIZE
#: The pipes between the kernel's send, the event loop and ``btrfs receive`` hold a whole
#: frame: with Linux's default 64 KiB, every MiB took 16 trips through the loop on each side
#: (the most an unprivileged pipe may hold is /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_BYTES = DEFAULT_CHUNK_SIZE
#: A receive writes the filesystem back (syncfs, in the background) each time this much more
#: of the stream went to ``btrfs receive``: a stream is acknowledged only once it is durable, and
#: left to the end, a 1 GiB rebuild's final syncfs took 1.1-1.3 s after its last byte arrived
#: (0.1-0.25 s now; the rebuild 166-177 -> 219-231 MiB/s). Smaller streams, most increments,
#: never reach it: for a 64 MiB one, writing back every 16 MiB gained nothing measurable.
EARLY_WRITEBACK_BYTES = 128 << 20

#: Called with the number of bytes about to go on the wire; returns when they may.
Pacer = Callable[[int], Awaitable[None]]
#: Called with raw stream bytes as they are produced or applied (progress, metrics).
Progress = Callable[[int], None]


def widen_pipe(fd: int) -> None:
    """Give a pipe PIPE_BYTES of buffer, or leave it as it is where the system refuses."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


async def _no_pacing(_: int) -> None:
    return None


def _no_progress(_: int) -> None:
    return None


def snapshot_ref(ref: SnapRef) -> pb.SnapshotRef:
    return pb.SnapshotRef(epoch=ref.epoch, seq=ref.seq)


def ref_message(ref: SnapRef | None) -> pb.SnapshotRef | None:
    """For optional message fields: None leaves the field unset."""
    return None if ref is None else snapshot_ref(ref)


def ref_of(message: pb.SnapshotRef) -> SnapRef:
    return SnapRef(message.epoch, message.seq)


def frame_message(frame: Frame) -> pb.PushMessage:
    return pb.PushMessage(frame=pb.Frame(
        seq=frame.seq, payload=frame.payload, compressed=frame.compressed,
        raw_length=frame.raw_length, checksum=frame.checksum, last=frame.last,
        stream_digest=frame.stream_digest))


def frame_of(message: pb.Frame) -> Frame:
    return Frame(seq=message.seq, payload=message.payload, compressed=message.compressed,
                 raw_length=message.raw_length, checksum=message.checksum, last=message.last,
                 stream_digest=message.stream_digest)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One snapshot to ship."""

    lineage: Lineage
    snapshot: SnapRef
    parent: SnapRef | None
    header: pb.StreamHeader
    skip: int = 0  # bytes the receiver already holds (a resumed full stream)


async def stream_snapshot(out: Outgoing, *, pace: Pacer = _no_pacing,
                          progress: Progress = _no_progress,
                          compress: CompressionPolicy = NEVER_COMPRESS,
                          record: Recorder | None = None,
                          ) -> AsyncGenerator[pb.PushMessage | bytes, None]:
    """Yield the header and frames of ``out``: the request stream of a ``Push`` call made
    with :func:`~.push_wire.request_wire` as its serializer (frames come encoded already).
    ``record`` is given every encoded frame before it goes (see :mod:`.shared_streams`).

    The kernel writes the send stream into a pipe from a worker thread (``btrfs.send``) while
    the event loop reads the other end: no ``btrfs send`` process per snapshot.
    """
    parent = out.lineage.path(out.parent) if out.parent is not None else None
    yield pb.PushMessage(header=out.header)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    widen_pipe(read_fd)

    def produce() -> None:
        try:
            btrfs.send(out.lineage.path(out.snapshot), write_fd, parent=parent)
        finally:
            os.close(write_fd)  # the reader sees the end of the stream

    sender = _in_own_thread(produce, f"send-{out.snapshot.name}")
    encoder = FrameEncoder(compress=compress)
    to_skip = out.skip
    try:
        async with contextlib.aclosing(_pipe_chunks(read_fd)) as chunks:
            async for chunk in chunks:
                if to_skip:
                    dropped = min(to_skip, len(chunk))
                    to_skip -= dropped
                    chunk = chunk[dropped:]
                    if not chunk:
                        continue
                for frame in encoder.feed(chunk):
                    await pace(len(frame.payload))
                    progress(frame.raw_length)
                    yield _encoded(frame, record)
        try:
            await sender
        except OSError as exc:
            raise Internal(f"btrfs send failed: {exc}") from exc
        if to_skip:
            raise FailedPrecondition("the receiver holds more of this stream than it is long")
        last = encoder.finish()
        await pace(len(last.payload))
        progress(last.raw_length)
        yield _encoded(last, record)
    finally:
        os.close(read_fd)  # a send still writing fails with EPIPE, and its thread ends
        if not sender.done():
            with contextlib.suppress(OSError):
                await asyncio.shield(sender)


def _encoded(frame: Frame, record: Recorder | None) -> bytes:
    wire = encode_frame(frame)
    if record is not None:
        record(wire, len(frame.payload), frame.raw_length, frame.last)
    return wire


async def _pipe_chunks(fd: int) -> AsyncGenerator[bytes, None]:
    """What a pipe holds, in pieces of exactly READ_SIZE bytes (the last one shorter), until
    its write end closes.

    Read straight from the descriptor whenever it is readable, and joined once into a whole
    frame's worth, which the encoder then frames without another copy. asyncio's pipe
    transport read 256 KiB at a time and copied each piece twice more through a StreamReader's
    buffer, and the encoder once more: 0.7 ms per MiB of the sender's event loop. (A full pipe
    holds a little less than its size here: ``btrfs send`` writes commands of about 48 KiB,
    and a pipe's pages are not shared between writes.) The descriptor stays the caller's.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    pieces: list[bytes] = []
    held = 0
    while True:
        try:
            piece = os.read(fd, READ_SIZE - held)
        except BlockingIOError:
            await _readable(loop, fd)
            continue
        if not piece:
            break
        pieces.append(piece)
        held += len(piece)
        if held == READ_SIZE:
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces, held = [], 0
    if pieces:
        yield b"".join(pieces)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until ``fd`` can be read (or its write end closed)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _in_own_thread(work: Callable[[], None], name: str) -> asyncio.Future[None]:
    """Run ``work`` in a thread of its own; the future ends with it.

    Not the loop's default executor: a paced send blocks its thread on a full pipe for as long
    as the transfer lasts, and a few of them would starve every other ``to_thread`` call of
    the agent (a Synchronous commit's snapshot among them).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


async def _pump_frames(messages: AsyncIterator[pb.PushMessage],
                       sink: Callable[[bytes], Awaitable[None]], decoder: FrameDecoder,
                       progress: Progress) -> None:
    """Verify frames and hand their bytes to ``sink``; the last frame only once it verified."""
    async for message in messages:
        if message.WhichOneof("body") != "frame":
            raise InvalidArgument("a replication stream carries one header, then frames only")
        raw = decoder.accept(frame_of(message.frame))
        await sink(raw)
        progress(len(raw))
        if decoder.finished:
            return
    raise CorruptFrame(FrameFault.TRUNCATED, decoder.next_seq,
                       "the stream ended without its last frame")


#: ``btrfs receive`` confined to the directory it receives into. The stream comes from a peer,
#: and its commands name paths that ``btrfs receive`` otherwise joins to that directory as
#: they are: a ``mkfile ../../../etc/cron.d/x`` writes there, as root, on the receiving node
#: (tried here with btrfs-progs 6.2). One compromised node could then take every node it
#: replicates to. Chrooted, ``..`` stops at the replica's snapshot directory; incremental
#: streams still find their parent and clone sources, which live in that same directory.
RECEIVE_ARGV = ("btrfs", "receive", "--chroot", "-e")


async def _run_receive(target: Path, source: AsyncIterator[bytes] | Path) -> None:
    """Run ``btrfs receive`` into ``target`` from a byte source (or a spool file)."""
    # opening a local spool file does not block in any way that matters
    stdin_file = open(source, "rb") if isinstance(source, Path) else None  # noqa: SIM115, ASYNC230
    try:
        proc = await asyncio.create_subprocess_exec(
            *RECEIVE_ARGV, str(target),
            stdin=stdin_file if stdin_file is not None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    finally:
        if stdin_file is not None:
            stdin_file.close()
    assert proc.stderr is not None
    stderr_task = asyncio.ensure_future(proc.stderr.read())
    try:
        cut_short = False
        if not isinstance(source, Path):
            assert proc.stdin is not None
            pipe = proc.stdin.transport.get_extra_info("pipe")
            if pipe is not None:
                widen_pipe(pipe.fileno())
            try:
                async for raw in source:
                    proc.stdin.write(raw)
                    await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                cut_short = True  # it exited: its exit code and stderr say why
        code = await proc.wait()
        stderr = await stderr_task
    except BaseException:
        if proc.returncode is None:
            proc.kill()  # never let a partial stream reach END: the leftover stays writable
            await proc.wait()
        stderr_task.cancel()
        raise
    if code != 0 or cut_short:
        said = _receive_errors(stderr) or "it stopped reading"
        # the kernel's ENOSPC, as btrfs-progs prints it: the replica is full, not broken
        failure = ResourceExhausted if os.strerror(errno.ENOSPC) in said else Internal
        raise failure(f"btrfs receive failed (exit {code}): {said}")


def _receive_errors(stderr: bytes) -> str:
    """What ``btrfs receive`` said, without the "Chroot to ..." line it prints every time."""
    lines = stderr.decode(errors="replace").splitlines()
    return "\n".join(line for line in lines if not line.startswith("Chroot to ")).strip()


async def _apply_stream(lineage: Lineage, messages: AsyncIterator[pb.PushMessage],
                        decoder: FrameDecoder, guard: SubvolumeGuard, progress: Progress, *,
                        prefix: Path | None = None, spool: SpoolWriter | None = None) -> None:
    """Feed verified frames to ``btrfs receive`` as they arrive (after ``prefix``, the bytes of
    a resumed stream already held), copying them to ``spool`` when given. ``guard`` sees every
    byte first: a stream that would create any subvolume but the one asked for stops before
    the bytes that show it reach ``btrfs receive``."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)

    async def produce() -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            yield item

    receiver = asyncio.ensure_future(_run_receive(lineage.directory, produce()))

    async def feed(item: bytes | None) -> None:
        """Queue ``item`` for btrfs receive, unless it stopped: a receive that failed (a full
        filesystem, say) never takes from the queue again, and a put into the full queue would
        wait for ever, with the sender's stream stalled behind it."""
        if not receiver.done():
            put = asyncio.ensure_future(queue.put(item))
            await asyncio.wait({put, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if put.done():
                return
            put.cancel()
        receiver.result()  # surfaces btrfs receive's failure
        raise Internal("btrfs receive stopped before the end of the stream")

    unflushed = 0
    flushing: asyncio.Future[None] | None = None

    async def sink(raw: bytes) -> None:
        nonlocal unflushed, flushing
        guard.feed(raw)
        if spool is not None:
            await spool.append(raw)
        await feed(raw)
        unflushed += len(raw)
        if unflushed >= EARLY_WRITEBACK_BYTES and (flushing is None or flushing.done()):
            unflushed = 0
            flushing = asyncio.ensure_future(asyncio.to_thread(_write_back, lineage.directory))

    try:
        if prefix is not None:
            with open(prefix, "rb") as held:  # noqa: ASYNC230 - local reads between awaits
                while chunk := held.read(READ_SIZE):
                    guard.feed(chunk)
                    await feed(chunk)
        await _pump_frames(messages, sink, decoder, progress)
        await feed(None)
        await receiver
        if flushing is not None:
            await flushing
    except BaseException:
        receiver.cancel()
        with contextlib.suppress(BaseException):
            await receiver
        lineage.discard_partial()
        raise


def _write_back(directory: Path) -> None:
    """An early write-back: its errors are the final syncfs's to report."""
    with contextlib.suppress(OSError):
        syncfs(directory)


async def receive_snapshot(lineage: Lineage, header: pb.StreamHeader,
                           messages: AsyncIterator[pb.PushMessage], spool: Spool,
                           progress: Progress = _no_progress) -> SnapRef:
    """Apply one incoming stream to ``lineage``, all of it or nothing, and make it durable."""
    ref = ref_of(header.snapshot)
    decoder = FrameDecoder()
    guard = SubvolumeGuard(ref.name)
    lineage.ensure()
    lineage.discard_partial()
    if header.HasField("parent"):
        parent = ref_of(header.parent)
        if parent not in lineage.complete():
            raise FailedPrecondition(f"missing parent snapshot {parent.name}")
        await _apply_stream(lineage, messages, decoder, guard, progress)
    else:
        await _receive_full(lineage, header, messages, spool, decoder, guard, progress)
    if ref not in lineage.complete():
        raise Internal(f"btrfs receive finished but {ref.name} is not complete")
    # btrfs receive writes through the page cache and does not sync: write the snapshot back
    # before it is acknowledged, or a crash of this node could lose what the sender counts on
    # (a Synchronous fsync's quorum)
    await asyncio.to_thread(syncfs, lineage.directory)
    return ref


async def _receive_full(lineage: Lineage, header: pb.StreamHeader,
                        messages: AsyncIterator[pb.PushMessage], spool: Spool,
                        decoder: FrameDecoder, guard: SubvolumeGuard,
                        progress: Progress) -> None:
    """A full stream: applied as it arrives and spooled (fsynced) alongside, so that an
    interrupted transfer resumes from the verified bytes it already has."""
    ref = ref_of(header.snapshot)
    path = spool.path(ref)
    held = path.stat().st_size if path.exists() else 0
    if header.resume_offset != held:
        spool.clear()
        if header.resume_offset:
            raise Aborted(f"resume offset {header.resume_offset} does not match the "
                          f"{held} bytes held; restart the transfer")
        held = 0
    spool.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    writer = SpoolWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    try:
        await _apply_stream(lineage, messages, decoder, guard, progress,
                            prefix=path if held else None, spool=writer)
    except (Internal, StreamRefused):
        writer.drop()
        spool.clear()  # btrfs or the guard refused the stream: not worth resuming
        raise
    except BaseException:
        await writer.keep()  # what verified so far survives for a resume
        raise
    writer.drop()
    failpoints.hit("agent.receive.before_spool_clear")
    spool.clear()
