"""Deterministic test images: real gzip'ed tar layers with valid image configs.

Layers hold pseudo-random (incompressible) bytes from AES-CTR keyed by a seed string,
so every run produces byte-identical blobs and digests, while proxies still move real
megabytes.  Configs carry ``rootfs.diff_ids`` that match the uncompressed tars, which
is what docker, containerd and skopeo check when they unpack.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

#: Accept header that gets every manifest type back unchanged.  distribution 2.8
#: answers 404 for an OCI index unless the client accepts it, and rewrites a Docker
#: list to the amd64 manifest for clients that do not accept lists.
ALL_MANIFEST_TYPES = f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"

#: Fixed timestamp so configs (and hence digests) never change between runs.
EPOCH = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"

CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_stream(seed: str, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield ``size`` pseudo-random bytes derived from ``seed`` (AES-CTR, GB/s fast)."""
    key = hashlib.sha256(seed.encode()).digest()[:16]
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    zeros = bytes(chunk)
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield encryptor.update(zeros[:n])
        remaining -= n


def random_bytes(seed: str, size: int) -> bytes:
    return b"".join(random_stream(seed, size))


@dataclass(frozen=True)
class Blob:
    """A blob to push: in memory (``data``) or on disk (``path``, streamed)."""

    digest: str
    size: int
    media_type: str
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None
    #: sha256 of the uncompressed tar, for layers.
    diff_id: str | None = None

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass(frozen=True)
class SeededImage:
    """What was pushed for one tag; tests compare proxy answers against this."""

    repository: str
    tag: str
    #: Manifest digest (``sha256:...``), i.e. the ``Docker-Content-Digest``.
    digest: str
    media_type: str
    manifest: bytes = field(repr=False)
    #: None for lists/indexes.
    config_digest: str | None = None
    config: bytes | None = field(default=None, repr=False)
    #: Layer blobs (digest, size, media type, diff_id); empty for lists/indexes.
    layers: tuple[Blob, ...] = ()
    #: Child manifest digests, for lists/indexes, in manifest order.
    children: tuple[str, ...] = ()
    #: ``"linux/amd64"`` → child image, for lists/indexes.
    platforms: dict[str, SeededImage] = field(
        default_factory=dict, hash=False, compare=False
    )
    platform: str = "linux/amd64"

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def is_index(self) -> bool:
        return self.media_type in (DOCKER_LIST, OCI_INDEX)

    def blobs(self) -> list[Blob]:
        """Config + layers (of all children, for an index), deduplicated."""
        seen: dict[str, Blob] = {}
        for child in [self, *self.platforms.values()]:
            if child.config_digest and child.config is not None:
                seen.setdefault(
                    child.config_digest,
                    Blob(
                        child.config_digest,
                        len(child.config),
                        "config",
                        data=child.config,
                    ),
                )
            for layer in child.layers:
                seen.setdefault(layer.digest, layer)
        return list(seen.values())


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = size
        info.mode = 0o644
    return info


def make_layer(seed: str, size: int, oci: bool) -> Blob:
    """A small layer: a tar with one random file under ``regproxy-test/``, gzip'ed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo("regproxy-test", directory=True))
        name = (
            "regproxy-test/" + hashlib.sha256(seed.encode()).hexdigest()[:16] + ".bin"
        )
        tar.addfile(_tarinfo(name, size), io.BytesIO(random_bytes(seed, size)))
    raw = buf.getvalue()
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    return Blob(
        digest=sha256_digest(gz),
        size=len(gz),
        media_type=OCI_LAYER if oci else DOCKER_LAYER,
        data=gz,
        diff_id=sha256_digest(raw),
    )


def make_config(label: str, platform: str, layers: list[Blob]) -> bytes:
    """A minimal but valid image config (docker/ctr/skopeo unpack with it)."""
    os_, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    config: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "created": CREATED,
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.regproxy.test": label},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": CREATED, "created_by": f"regproxy test layer {i}"}
            for i in range(len(layers))
        ],
    }
    if variant:
        config["variant"] = variant
    return json.dumps(config, indent=2, sort_keys=True).encode()


def _manifest_bytes(doc: dict[str, Any]) -> bytes:
    # 3-space indent like docker's own output: tests can then catch proxies that
    # re-serialize JSON (the digest would change).
    return json.dumps(doc, indent=3).encode()


def image_from_layers(
    repository: str, tag: str, label: str, layers: list[Blob], platform: str, oci: bool
) -> SeededImage:
    config = make_config(label, platform, layers)
    config_digest = sha256_digest(config)
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(config),
            "digest": config_digest,
        },
        "layers": [layer.descriptor() for layer in layers],
    }
    manifest = _manifest_bytes(doc)
    return SeededImage(
        repository=repository,
        tag=tag,
        digest=sha256_digest(manifest),
        media_type=media_type,
        manifest=manifest,
        config_digest=config_digest,
        config=config,
        layers=tuple(layers),
        platform=platform,
    )


def make_image(
    repository: str,
    tag: str,
    *,
    seed: str,
    platform: str = "linux/amd64",
    oci: bool = False,
    layer_sizes: tuple[int, ...] = (96 << 10, 160 << 10),
) -> SeededImage:
    """A single-platform image whose layers hold ``layer_sizes`` random bytes each."""
    layers = [
        make_layer(f"{seed}/{platform}/{i}", n, oci) for i, n in enumerate(layer_sizes)
    ]
    return image_from_layers(repository, tag, seed, layers, platform, oci)


def make_index(
    repository: str, tag: str, children: list[SeededImage], oci: bool
) -> SeededImage:
    """A Docker manifest list or OCI index over already built ``children``."""
    entries = []
    for child in children:
        os_, _, rest = child.platform.partition("/")
        arch, _, variant = rest.partition("/")
        plat: dict[str, str] = {"architecture": arch, "os": os_}
        if variant:
            plat["variant"] = variant
        entries.append(
            {
                "mediaType": child.media_type,
                "size": child.size,
                "digest": child.digest,
                "platform": plat,
            }
        )
    media_type = OCI_INDEX if oci else DOCKER_LIST
    manifest = _manifest_bytes(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    )
    return SeededImage(
        repository=repository,
        tag=tag,
        digest=sha256_digest(manifest),
        media_type=media_type,
        manifest=manifest,
        children=tuple(c.digest for c in children),
        platforms={c.platform: c for c in children},
        platform="",
    )


def write_big_layer(path: Path, size: int, seed: str = "big") -> Blob:
    """Stream a one-file tar of ``size`` random bytes through gzip level 0 into ``path``.

    Level 0 keeps it at disk speed (a 1 GiB layer in a few seconds); both digests are
    computed on the way so the file is never read back.  Result metadata is cached
    next to the file as JSON, so a second call with the same size is free.
    """
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("size") == size and path.stat().st_size == meta["compressed_size"]:
            return Blob(
                meta["digest"],
                meta["compressed_size"],
                DOCKER_LAYER,
                path=path,
                diff_id=meta["diff_id"],
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    diff = hashlib.sha256()
    comp = hashlib.sha256()
    gz = zlib.compressobj(0, zlib.DEFLATED, 31)  # wbits 31 = gzip wrapper
    written = 0
    with tmp.open("wb") as out:

        def emit(raw: bytes) -> None:
            nonlocal written
            diff.update(raw)
            data = gz.compress(raw)
            if data:
                comp.update(data)
                out.write(data)
                written += len(data)

        emit(_tarinfo("big", directory=True).tobuf(format=tarfile.GNU_FORMAT))
        emit(_tarinfo("big/blob.bin", size).tobuf(format=tarfile.GNU_FORMAT))
        for chunk in random_stream(seed, size, 4 << 20):
            emit(chunk)
        pad = (-size) % tarfile.BLOCKSIZE
        emit(b"\0" * (pad + 2 * tarfile.BLOCKSIZE))
        tail = gz.flush()
        comp.update(tail)
        out.write(tail)
        written += len(tail)
    tmp.replace(path)
    blob = Blob(
        "sha256:" + comp.hexdigest(),
        written,
        DOCKER_LAYER,
        path=path,
        diff_id="sha256:" + diff.hexdigest(),
    )
    meta_path.write_text(
        json.dumps(
            {
                "size": size,
                "digest": blob.digest,
                "compressed_size": written,
                "diff_id": blob.diff_id,
            }
        )
    )
    return blob
