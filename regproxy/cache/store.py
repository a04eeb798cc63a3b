"""The blob store on disk: content-addressed files plus a small SQLite index.

Layout under the cache directory::

    blobs/sha256/ab/abcdef...      complete, verified blobs (renamed into place)
    partial/sha256-abcdef...       a fill in progress; its flock marks the filler
    partial/sha256-abcdef....json  the fill's size and media type (for followers)
    index.sqlite                   blobs (size, type, last access), repository links

A blob is written to its partial file and renamed into C{blobs/} only after
its digest and length are verified, so nothing half-written is ever at a final
path. A partial whose lock nobody holds is a dead fill (a killed process) and
is removed. Several worker processes share the directory: the lock on a
partial says which process fills it, SQLite (WAL) keeps the index consistent.

Who may read a blob is not stored here beyond the facts: which repository
(of which upstream) links which digest. Rights are checked per request.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

_ALGORITHMS = {"sha256": 64, "sha512": 128}
#: Small content (manifests) is also kept in memory, least recently used out
#: first, up to this many bytes: a cached manifest is answered without opening
#: its file (per-request file I/O was the largest share of regproxy's own CPU
#: on that path). The bytes are content-addressed and verified, so a copy in
#: memory can't be wrong; whether they may be served is still decided by the
#: index and the rights checks.
SMALL_IN_MEMORY = 16 << 20
_SMALL_ENTRY = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs (last_access);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    accept TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    validated REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag, accept)
);
CREATE TABLE IF NOT EXISTS links (
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest)
);
"""


def split_digest(digest: str) -> tuple[str, str] | None:
    """C{(algorithm, hex)} for a digest the store can hold (sha256, sha512), else C{None}."""
    algorithm, _, encoded = digest.partition(":")
    if _ALGORITHMS.get(algorithm) != len(encoded) or encoded.strip("0123456789abcdef"):
        return None
    return algorithm, encoded


@dataclass(frozen=True)
class Tag:
    """What a tag resolved to for one set of accepted media types, and when that was last checked."""

    digest: str
    media_type: str
    size: int
    validated: float


@dataclass(frozen=True)
class Blob:
    """A complete blob in the store."""

    digest: str
    size: int
    media_type: str
    path: Path


class Store:
    """The cache directory: paths, index, recovery at start, eviction by size.

    @ivar max_size: bytes of complete blobs kept at most (0: no limit).
    """

    log = Logger()

    def __init__(self, directory: str | os.PathLike[str], max_size: int = 0) -> None:
        self.root = Path(directory)
        self.max_size = max_size
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite", timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        #: Blob files this process is reading (never evicted while so).
        self._reading: dict[str, int] = {}
        self._touched: dict[str, float] = {}
        self._small: OrderedDict[str, bytes] = OrderedDict()
        self._small_size = 0
        self._degraded_until = 0.0
        #: Told how many blobs each eviction removed (metrics).
        self.on_evict: Callable[[int], None] | None = None
        self.recover()

    # health

    def degraded(self, error: OSError) -> None:
        """A write failed (disk full, I/O error): take no new fills for a while."""
        self.log.warn("cache: write failed ({error}); passing blobs through uncached for 30s", error=error.strerror)
        self._degraded_until = time.monotonic() + 30

    def room_for(self, size: int) -> bool:
        """Whether a new blob of C{size} bytes may be filled now (limit, free disk, health)."""
        if time.monotonic() < self._degraded_until:
            return False
        if self.max_size and size > self.max_size:
            return False
        try:
            stat = os.statvfs(self.root)
        except OSError:
            return False
        free = stat.f_bavail * stat.f_frsize
        if free < size + (64 << 20):
            self.evict(reserve=size)
            stat = os.statvfs(self.root)
            free = stat.f_bavail * stat.f_frsize
        return free >= size + (16 << 20)

    # paths

    def blob_path(self, digest: str) -> Path:
        algorithm, encoded = split_digest(digest) or ("invalid", "xx")
        return self.root / "blobs" / algorithm / encoded[:2] / encoded

    def partial_path(self, digest: str) -> Path:
        algorithm, encoded = split_digest(digest) or ("invalid", "x")
        return self.root / "partial" / f"{algorithm}-{encoded}"

    # lookups

    def complete(self, digest: str) -> Blob | None:
        """The complete blob, if the store has it (index row and file both there)."""
        row = self._db.execute("SELECT size, media_type FROM blobs WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        path = self.blob_path(digest)
        try:
            if path.stat().st_size != row[0]:
                raise FileNotFoundError(path)
        except FileNotFoundError:
            self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            return None
        return Blob(digest, int(row[0]), str(row[1]), path)

    def linked(self, upstream: str, repository: str, digest: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM links WHERE upstream = ? AND repository = ? AND digest = ?", (upstream, repository, digest)
        ).fetchone()
        return row is not None

    def link(self, upstream: str, repository: str, digest: str) -> None:
        """Remember that C{repository} of C{upstream} holds C{digest} (the upstream said so)."""
        self._db.execute(
            "INSERT OR IGNORE INTO links (upstream, repository, digest) VALUES (?, ?, ?)", (upstream, repository, digest)
        )

    # small content (manifests), kept by digest like blobs

    def put_bytes(self, digest: str, data: bytes, media_type: str) -> None:
        """Store verified small content (a manifest) under its digest."""
        if self.complete(digest) is not None:
            self.touch(digest)
            return
        partial = self.partial_path(digest).with_suffix(".small")
        partial.write_bytes(data)
        self._place(partial, digest, len(data), media_type)
        self._keep_small(digest, data)

    def read_bytes(self, blob: Blob) -> bytes | None:
        """The content of a small blob that L{complete} found."""
        data = self._small.get(blob.digest)
        if data is not None and len(data) == blob.size:
            self._small.move_to_end(blob.digest)
        else:
            try:
                data = blob.path.read_bytes()
            except FileNotFoundError:
                return None
            if len(data) != blob.size:
                return None
            self._keep_small(blob.digest, data)
        self.touch(blob.digest)
        return data

    def _keep_small(self, digest: str, data: bytes) -> None:
        if len(data) > _SMALL_ENTRY or digest in self._small:
            return
        self._small[digest] = data
        self._small_size += len(data)
        while self._small_size > SMALL_IN_MEMORY:
            _, dropped = self._small.popitem(last=False)
            self._small_size -= len(dropped)

    # tags

    def tag(self, upstream: str, repository: str, tag: str, accept: str) -> Tag | None:
        row = self._db.execute(
            "SELECT digest, media_type, size, validated FROM tags "
            "WHERE upstream = ? AND repository = ? AND tag = ? AND accept = ?",
            (upstream, repository, tag, accept),
        ).fetchone()
        return None if row is None else Tag(str(row[0]), str(row[1]), int(row[2]), float(row[3]))

    def set_tag(self, upstream: str, repository: str, tag: str, accept: str, found: Tag) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tags (upstream, repository, tag, accept, digest, media_type, size, validated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (upstream, repository, tag, accept, found.digest, found.media_type, found.size, found.validated),
        )

    def forget_tag(self, upstream: str, repository: str, tag: str, accept: str) -> None:
        self._db.execute(
            "DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ? AND accept = ?",
            (upstream, repository, tag, accept),
        )

    def unlink(self, upstream: str, repository: str, reference: str) -> None:
        """The client deleted C{reference} (a digest or a tag) of this repository through the proxy: forget the link."""
        self._db.execute(
            "DELETE FROM links WHERE upstream = ? AND repository = ? AND digest = ?", (upstream, repository, reference)
        )
        self._db.execute(
            "DELETE FROM tags WHERE upstream = ? AND repository = ? AND (tag = ? OR digest = ?)",
            (upstream, repository, reference, reference),
        )

    def touch(self, digest: str) -> None:
        """Note an access (written to the index in batches, see L{flush})."""
        self._touched[digest] = time.time()
        if len(self._touched) >= 256:
            self.flush()

    def flush(self) -> None:
        touched, self._touched = self._touched, {}
        if touched:
            self._db.executemany(
                "UPDATE blobs SET last_access = ? WHERE digest = ?", [(t, d) for d, t in touched.items()]
            )

    # reading: never evicted meanwhile

    def open_for_reading(self, blob: Blob) -> int:
        """An fd on the blob with a shared lock that keeps eviction (in any process) away."""
        fd = os.open(blob.path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._reading[blob.digest] = self._reading.get(blob.digest, 0) + 1
        self.touch(blob.digest)
        return fd

    def done_reading(self, digest: str, fd: int) -> None:
        os.close(fd)
        left = self._reading.get(digest, 1) - 1
        if left:
            self._reading[digest] = left
        else:
            self._reading.pop(digest, None)

    # filling

    def write_fill_info(self, digest: str, size: int, media_type: str) -> None:
        """Tell followers in other processes how big the blob being filled is."""
        info = self.partial_path(digest).with_suffix(".json")
        tmp = info.with_suffix(".tmp")
        tmp.write_text(json.dumps({"size": size, "media_type": media_type}))
        os.replace(tmp, info)

    def fill_info(self, digest: str) -> tuple[int, str] | None:
        try:
            data = json.loads(self.partial_path(digest).with_suffix(".json").read_text())
            return int(data["size"]), str(data["media_type"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def discard_partial(self, digest: str) -> None:
        path = self.partial_path(digest)
        for p in (path, path.with_suffix(".json")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _place(self, source: Path, digest: str, size: int, media_type: str) -> Path:
        """Rename verified content to its final path and index it."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, final)
        now = time.time()
        self._db.execute(
            "INSERT OR REPLACE INTO blobs (digest, size, media_type, created, last_access) VALUES (?, ?, ?, ?, ?)",
            (digest, size, media_type, now, now),
        )
        return final

    def commit(self, digest: str, size: int, media_type: str) -> Path:
        """Move a verified partial into place and index it."""
        partial = self.partial_path(digest)
        final = self._place(partial, digest, size, media_type)
        partial.with_suffix(".json").unlink(missing_ok=True)
        self.evict()
        return final

    # size and eviction

    def total_size(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0])

    def evict(self, reserve: int = 0) -> list[str]:
        """Remove least-recently-used complete blobs until the store fits its limit (with C{reserve} bytes to spare).

        A blob being read (here or, by its shared lock, in another process) is
        skipped; so is anything being filled (partials are not in the index).
        """
        if not self.max_size:
            return []
        self.flush()
        excess = self.total_size() + reserve - self.max_size
        removed: list[str] = []
        if excess <= 0:
            return removed
        for digest, size in self._db.execute("SELECT digest, size FROM blobs ORDER BY last_access, created").fetchall():
            if excess <= 0:
                break
            if digest in self._reading:
                continue
            path = self.blob_path(digest)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process is reading it
                path.unlink()
                self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            finally:
                os.close(fd)
            excess -= size
            removed.append(digest)
        if removed:
            self.log.info("cache: evicted {count} blob(s) to stay under {limit} bytes", count=len(removed), limit=self.max_size)
            if self.on_evict is not None:
                self.on_evict(len(removed))
        return removed

    # start-up

    def recover(self) -> None:
        """Drop dead partials (their lock is free: the filler is gone), and index rows whose file is gone."""
        for path in list((self.root / "partial").iterdir()):
            if path.suffix in (".json", ".tmp", ".small"):
                if path.suffix != ".json" or not path.with_suffix("").exists():
                    path.unlink(missing_ok=True)
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live fill in another worker
            try:
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
                self.log.info("cache: dropped the unfinished fill {name}", name=path.name)
            finally:
                os.close(fd)
        for (digest,) in self._db.execute("SELECT digest FROM blobs").fetchall():
            if not self.blob_path(digest).exists():
                self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        self.evict()

    def digests(self) -> Iterator[tuple[str, int, float]]:
        """Every complete blob: digest, size, last access (for listing the cache)."""
        self.flush()
        for digest, size, last in self._db.execute("SELECT digest, size, last_access FROM blobs ORDER BY last_access DESC"):
            yield str(digest), int(size), float(last)

    def close(self) -> None:
        self.flush()
        self._db.close()
