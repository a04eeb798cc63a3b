"""The cache's parts in memory: ranges, the store, a fill and its readers, a fill in another worker."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from regproxy.cache.fill import Fill, RemoteFill
from regproxy.cache.reader import FileBody
from regproxy.cache.store import Store, split_digest
from regproxy.ranges import ByteRange, Unsatisfiable, parse_range


@pytest.mark.parametrize(
    "header, size, expected",
    [
        (None, 10, None),
        (b"bytes=0-", 10, ByteRange(0, 9, 10)),
        (b"bytes=2-5", 10, ByteRange(2, 5, 10)),
        (b"bytes=5-100", 10, ByteRange(5, 9, 10)),
        (b"bytes=-3", 10, ByteRange(7, 9, 10)),
        (b"bytes=-30", 10, ByteRange(0, 9, 10)),
        (b"bytes=0-1,4-5", 10, None),
        (b"items=0-1", 10, None),
        (b"bytes=5-2", 10, None),
        (b"bytes=-", 10, None),
    ],
)
def test_parse_range(header: bytes | None, size: int, expected: ByteRange | None) -> None:
    """One byte range is served as a range; several, other units or nonsense mean the whole blob."""
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header, size", [(b"bytes=10-", 10), (b"bytes=-0", 10), (b"bytes=0-", 0)])
def test_unsatisfiable_range(header: bytes, size: int) -> None:
    """A range that selects no byte is a 416."""
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_split_digest() -> None:
    """The store holds sha256 and sha512 digests only, lowercase hex of the right length."""
    assert split_digest("sha256:" + "a" * 64) == ("sha256", "a" * 64)
    assert split_digest("sha512:" + "b" * 128) == ("sha512", "b" * 128)
    assert split_digest("sha256:" + "A" * 64) is None and split_digest("md5:" + "a" * 32) is None


class FakeBody:
    """An upstream response whose body the test feeds by hand."""

    def __init__(self, code: int = 200, length: int = 0) -> None:
        self.code = code
        self.length = length
        self.headers = Headers()
        self.protocol: Protocol | None = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.ended = reason


def new_fill(store: Store, data: bytes, clock: Clock, resume: Any = None) -> tuple[Fill, FakeBody]:
    digest = digest_of(data)
    fd = os.open(store.partial_path(digest), os.O_RDWR | os.O_CREAT)

    async def no_resume(offset: int) -> Any:
        raise AssertionError("unexpected resume")

    fill = Fill(store, digest, fd, clock, resume or no_resume, idle_timeout=10)
    body = FakeBody(length=len(data))
    fill.start(body, len(data), "application/octet-stream")  # type: ignore[arg-type]
    return fill, body


def reader_of(store: Store, fill: Fill, first: int = 0, last: int | None = None) -> tuple[FileBody, Collect]:
    fd = os.open(store.partial_path(fill.digest), os.O_RDONLY)
    body = FileBody(fd, first, fill.size - 1 if last is None else last, fill, lambda: os.close(fd))
    sink = Collect()
    body.deliver(sink)
    return body, sink


def test_readers_follow_a_fill_and_hold_back_the_last_byte(tmp_path: Path) -> None:
    """Readers get bytes as they are written, but not the last one until the digest is verified."""
    store, clock = Store(tmp_path), Clock()
    data = os.urandom(1000)
    fill, upstream = new_fill(store, data, clock)
    whole, whole_sink = reader_of(store, fill)
    part, part_sink = reader_of(store, fill, 100, 199)
    assert upstream.protocol is not None
    upstream.protocol.dataReceived(data[:500])
    assert whole_sink.data == data[:500] and part_sink.data == data[100:199]  # the range's last byte held back
    upstream.protocol.dataReceived(data[500:])
    assert whole_sink.data == data[:999] and whole_sink.ended is None
    upstream.protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified and store.complete(fill.digest) is not None
    assert whole_sink.data == data and whole_sink.ended is not None and whole_sink.ended.check(ResponseDone)
    assert part_sink.data == data[100:200] and part_sink.ended is not None and part_sink.ended.check(ResponseDone)


def test_wrong_bytes_fail_every_reader_and_store_nothing(tmp_path: Path) -> None:
    """A body whose digest doesn't match: readers end with a failure, short by a byte, and no blob is stored."""
    store, clock = Store(tmp_path), Clock()
    data = os.urandom(1000)
    fill, upstream = new_fill(store, data, clock)
    _, sink = reader_of(store, fill)
    assert upstream.protocol is not None
    upstream.protocol.dataReceived(b"x" * 1000)
    upstream.protocol.connectionLost(Failure(ResponseDone()))
    assert fill.failure is not None and store.complete(fill.digest) is None
    assert len(sink.data) == 999 and sink.ended is not None and not sink.ended.check(ResponseDone)
    assert not store.partial_path(fill.digest).exists()


def test_a_cut_body_resumes_from_where_it_stopped(tmp_path: Path) -> None:
    """An upstream body cut at byte N is resumed with Range from N; readers see only a pause."""
    store, clock = Store(tmp_path), Clock()
    data = os.urandom(1000)
    resumed: list[int] = []
    second = FakeBody(code=206, length=600)
    second.headers.setRawHeaders(b"content-range", [b"bytes 400-999/1000"])

    async def resume(offset: int) -> Any:
        resumed.append(offset)
        return second

    fill, first = new_fill(store, data, clock, resume)
    _, sink = reader_of(store, fill)
    assert first.protocol is not None
    first.protocol.dataReceived(data[:400])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    assert resumed == [400] and sink.ended is None
    assert second.protocol is not None
    second.protocol.dataReceived(data[400:])
    second.protocol.connectionLost(Failure(ResponseDone()))
    assert fill.verified and sink.data == data and fill.resumes == 1


def test_fill_far_from_done_is_abandoned_when_every_client_leaves(tmp_path: Path) -> None:
    """With no reader left, a large fill not half done stops (policy); one close to done would go on."""
    store, clock = Store(tmp_path), Clock()
    data = os.urandom(200 << 20)
    fill, upstream = new_fill(store, data, clock)
    reader, _ = reader_of(store, fill)
    assert upstream.protocol is not None
    upstream.protocol.dataReceived(data[: 1 << 20])
    reader.stopProducing()
    assert fill.failure is not None and upstream.transport.producerState == "stopped"


def test_store_commit_evict_and_recover(tmp_path: Path) -> None:
    """Committed blobs are indexed; over the limit the least recently used go; dead partials vanish at start."""
    store = Store(tmp_path, max_size=2500)
    blobs = [os.urandom(1000) for _ in range(3)]
    for i, data in enumerate(blobs):
        digest = digest_of(data)
        store.partial_path(digest).write_bytes(data)
        store.commit(digest, len(data), "application/octet-stream")
        store.touch(digest)
        store.flush()
        if i == 1:
            import time

            time.sleep(0.01)
            store.touch(digest_of(blobs[0]))
    assert store.complete(digest_of(blobs[1])) is None  # the least recently used one went
    assert store.complete(digest_of(blobs[0])) is not None and store.complete(digest_of(blobs[2])) is not None
    dead = store.partial_path("sha256:" + "e" * 64)
    dead.write_bytes(b"half")
    store.close()
    again = Store(tmp_path, max_size=2500)
    assert not dead.exists() and again.total_size() == 2000


def test_a_fill_in_another_worker_is_followed(tmp_path: Path) -> None:
    """A reader in another process follows a fill through the shared directory until it is committed."""
    filler_store, follower_store, clock = Store(tmp_path), Store(tmp_path), Clock()
    data = os.urandom(5000)
    fill, upstream = new_fill(filler_store, data, clock)
    import fcntl

    fcntl.flock(fill._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    remote = RemoteFill(follower_store, fill.digest, len(data), "application/octet-stream", clock)
    fd = os.open(follower_store.partial_path(fill.digest), os.O_RDONLY)
    body = FileBody(fd, 0, len(data) - 1, remote, lambda: os.close(fd))
    sink = Collect()
    body.deliver(sink)
    assert upstream.protocol is not None
    upstream.protocol.dataReceived(data[:3000])
    clock.advance(RemoteFill.POLL)
    assert sink.data == data[:3000]
    upstream.protocol.dataReceived(data[3000:])
    upstream.protocol.connectionLost(Failure(ResponseDone()))
    for _ in range(5):
        clock.advance(RemoteFill.POLL)
    assert sink.data == data and sink.ended is not None and sink.ended.check(ResponseDone)


def test_small_content_is_answered_from_memory_within_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests put or read once come from memory (no file read), the least recently used leave past the bound."""
    from regproxy.cache import store as store_module

    monkeypatch.setattr(store_module, "SMALL_IN_MEMORY", 3000)
    store = Store(tmp_path)
    docs = [os.urandom(1000) for _ in range(4)]
    for data in docs:
        store.put_bytes(digest_of(data), data, "application/vnd.oci.image.manifest.v1+json")
    reads: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    for data in docs[1:]:
        blob = store.complete(digest_of(data))
        assert blob is not None and store.read_bytes(blob) == data
    assert reads == []  # the three most recent were in memory
    blob = store.complete(digest_of(docs[0]))
    assert blob is not None and store.read_bytes(blob) == docs[0]
    assert len(reads) == 1  # the first had been dropped: read from its file, and kept again
