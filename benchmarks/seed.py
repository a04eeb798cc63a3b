"""Make random blobs and push them, plus a manifest, into the upstream registry.

Blobs are random so nothing on the path can compress them.  They are pushed
through the registry HTTP API (monolithic upload, body streamed from the
file) rather than written into its storage, so the upstream's state is
exactly what a `docker push` would leave.  The files and the upstream storage
are kept in the work directory and reused by later runs.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import random
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

REPO = "bench/data"
TAG = "latest"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CHUNK = 4 << 20


@dataclass
class Blob:
    path: Path
    size: int
    digest: str

    def url(self, base: str) -> str:
        return f"{base}/v2/{REPO}/blobs/{self.digest}"


@dataclass
class Manifest:
    body: bytes
    digest: str

    @staticmethod
    def url(base: str, ref: str = TAG) -> str:
        return f"{base}/v2/{REPO}/manifests/{ref}"


PULL_REPO = "bench/pull"


@dataclass
class Image:
    """A real image (gzipped tar layers, a config with their diff_ids) for the
    cold-pull test: what docker would get."""

    repo: str
    tag: str
    layers: list[Blob]
    config: bytes
    config_digest: str
    manifest: bytes
    digest: str

    @property
    def blob_bytes(self) -> int:
        return len(self.config) + sum(b.size for b in self.layers)


def make_blob(workdir: Path, size: int) -> Blob:
    """Random file of size bytes, reused if a previous run made it."""
    path = workdir / f"blob-{size}.bin"
    meta = workdir / f"blob-{size}.json"
    if path.exists() and meta.exists() and path.stat().st_size == size:
        return Blob(path, size, json.loads(meta.read_text())["digest"])
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    digest = "sha256:" + h.hexdigest()
    meta.write_text(json.dumps({"digest": digest}))
    return Blob(path, size, digest)


def _conn(base: str) -> http.client.HTTPConnection:
    u = urllib.parse.urlsplit(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=300, blocksize=1 << 20)


def _exists(base: str, path: str) -> bool:
    c = _conn(base)
    c.request("HEAD", path)
    status = c.getresponse().status
    c.close()
    return status == 200


def push_blob(base: str, data: bytes | None = None, blob: Blob | None = None,
              repo: str = REPO) -> str:
    """Upload bytes or a file as one blob; returns the digest."""
    if blob is None:
        assert data is not None
        digest, size = "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
    else:
        digest, size = blob.digest, blob.size
    if _exists(base, f"/v2/{repo}/blobs/{digest}"):
        return digest
    c = _conn(base)
    c.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    r = c.getresponse()
    r.read()
    if r.status != 202:
        raise RuntimeError(f"upload start: HTTP {r.status}")
    loc = urllib.parse.urlsplit(r.getheader("Location", ""))
    target = f"{loc.path}?{loc.query}&digest={urllib.parse.quote(digest)}"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    if blob is None:
        c.request("PUT", target, body=data, headers=headers)
    else:
        with open(blob.path, "rb") as f:
            c.request("PUT", target, body=f, headers=headers)  # streamed in 1 MiB blocks
    r = c.getresponse()
    r.read()
    c.close()
    if r.status != 201:
        raise RuntimeError(f"upload of {digest}: HTTP {r.status}")
    return digest


def make_image(workdir: Path, n_layers: int = 12, seed: int = 12) -> Image:
    """n layers of 1-4 MiB (sizes from a fixed seed), each a gzipped tar of one
    file of random bytes; reused from workdir by later runs."""
    d = workdir / f"pull-image-{n_layers}"
    meta = d / "image.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        layers = [Blob(d / f"layer-{i}.tar.gz", size, digest)
                  for i, (size, digest) in enumerate(m["layers"])]
        if all(b.path.exists() and b.path.stat().st_size == b.size for b in layers):
            config = (d / "config.json").read_bytes()
            manifest = (d / "manifest.json").read_bytes()
            return Image(PULL_REPO, "latest", layers, config, m["config_digest"], manifest,
                         "sha256:" + hashlib.sha256(manifest).hexdigest())
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    layers, diff_ids = [], []
    for i in range(n_layers):
        size = int(rng.uniform(1, 4) * (1 << 20))
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo(f"layer{i}/data.bin")
            info.size = size
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        tar_bytes = raw.getvalue()
        diff_ids.append("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
        gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
        path = d / f"layer-{i}.tar.gz"
        path.write_bytes(gz)
        layers.append(Blob(path, len(gz), "sha256:" + hashlib.sha256(gz).hexdigest()))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = schema2_manifest(config, config_digest, layers)
    (d / "config.json").write_bytes(config)
    (d / "manifest.json").write_bytes(manifest)
    meta.write_text(json.dumps({"layers": [(b.size, b.digest) for b in layers],
                                "config_digest": config_digest}))
    return Image(PULL_REPO, "latest", layers, config, config_digest, manifest,
                 "sha256:" + hashlib.sha256(manifest).hexdigest())


def schema2_manifest(config: bytes, config_digest: str, layers: list[Blob]) -> bytes:
    """A Docker schema-2 image manifest of this config and these gzipped layers."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": b.size, "digest": b.digest} for b in layers],
    }, indent=3).encode()


def push_image(base: str, image: Image) -> None:
    """Push the image's blobs and manifest (by tag) into the upstream."""
    for b in image.layers:
        push_blob(base, blob=b, repo=image.repo)
    push_blob(base, data=image.config, repo=image.repo)
    _put_manifest(base, image.repo, image.tag, image.manifest)


def _put_manifest(base: str, repo: str, ref: str, body: bytes) -> None:
    c = _conn(base)
    c.request("PUT", f"/v2/{repo}/manifests/{ref}", body=body,
              headers={"Content-Type": MANIFEST_TYPE})
    r = c.getresponse()
    r.read()
    c.close()
    if r.status != 201:
        raise RuntimeError(f"manifest push {repo}:{ref}: HTTP {r.status}")


def push_manifest(base: str, layers: list[Blob]) -> Manifest:
    """A schema-2 image manifest whose layers are the benchmark blobs."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = push_blob(base, data=config)
    body = schema2_manifest(config, config_digest, layers)
    _put_manifest(base, REPO, TAG, body)
    return Manifest(body, "sha256:" + hashlib.sha256(body).hexdigest())
