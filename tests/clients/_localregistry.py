"""Throwaway upstream for the client-harness self-tests.

A plain distribution registry (``/usr/bin/docker-registry``, 2.8) on
127.0.0.1, optionally with TLS from a self-signed CA made here with
``cryptography``, and tiny deterministic images pushed through the registry
HTTP API.  Nothing in here knows about regproxy.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def require_binary(name: str) -> str:
    """Absolute path of ``name``; raise (never skip) when it is missing."""
    if os.path.isabs(name):
        if not os.access(name, os.X_OK):
            raise FileNotFoundError(f"required binary {name} is missing")
        return name
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise FileNotFoundError(f"required binary {name!r} is not on PATH")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# TLS material


@dataclass
class TLSFiles:
    """A CA and a server certificate for 127.0.0.1 / localhost."""

    dir: Path
    ca_cert: Path  # PEM of the CA
    server_cert: Path  # PEM of the leaf (server_cert only, not the chain)
    server_key: Path
    cert_dir: Path  # directory holding only ``ca.crt`` (skopeo/podman --cert-dir)

    @property
    def ca_pem(self) -> str:
        return self.ca_cert.read_text()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))


def make_tls(directory: str | os.PathLike, names: tuple[str, ...] = ("localhost",),
             ips: tuple[str, ...] = ("127.0.0.1",)) -> TLSFiles:
    """Write a self-signed CA plus a server cert/key signed by it into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regproxy test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else ips[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = d / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path = d / "server.crt"
    cert_path.write_bytes(leaf.public_bytes(pem))
    key_path = d / "server.key"
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_dir = d / "certs.d"
    cert_dir.mkdir(exist_ok=True)
    (cert_dir / "ca.crt").write_bytes(ca.public_bytes(pem))
    return TLSFiles(d, ca_path, cert_path, key_path, cert_dir)


# --------------------------------------------------------------------------
# Images


@dataclass
class Image:
    """A single-platform image: manifest, config and gzip'ed layers, all bytes."""

    manifest: bytes
    manifest_type: str
    config: bytes
    layers: list[bytes]
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes (config + layers)

    @property
    def digest(self) -> str:
        """The manifest digest (what clients report as RepoDigest / image digest)."""
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)


def _layer(seed: int, size: int, name: str) -> tuple[bytes, str]:
    """Deterministic gzip'ed tar with one file of ``size`` random bytes; (blob, diff_id)."""
    rnd = random.Random(seed)
    payload = rnd.randbytes(size)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    raw = tbuf.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=1) as g:
        g.write(raw)
    return gz.getvalue(), sha256_digest(raw)


def make_image(seed: int = 1, layer_sizes: tuple[int, ...] = (4096,), oci: bool = False,
               corrupt_diff_id: bool = False) -> Image:
    """Build a tiny valid linux/amd64 image.

    ``corrupt_diff_id`` writes a wrong ``rootfs.diff_ids`` entry: every blob
    still matches its digest, so only a client that *unpacks* notices.
    """
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        blob, diff_id = _layer(seed * 1000 + i, size, f"file-{seed}-{i}.bin")
        layers.append(blob)
        diff_ids.append(diff_id)
    if corrupt_diff_id:
        diff_ids[0] = "sha256:" + "0" * 64
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "created": "2020-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": f"regproxy test layer {i}"}
                    for i in range(len(layers))],
    }, sort_keys=True).encode()
    mtype, ctype, ltype = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER) if oci else (
        DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": {"mediaType": ctype, "size": len(config), "digest": sha256_digest(config)},
        "layers": [{"mediaType": ltype, "size": len(b), "digest": sha256_digest(b)} for b in layers],
    }
    mbytes = json.dumps(manifest, indent=3).encode()
    blobs = {sha256_digest(config): config}
    blobs.update({sha256_digest(b): b for b in layers})
    return Image(mbytes, mtype, config, layers, blobs)


# --------------------------------------------------------------------------
# Registry


def _bcrypt(password: str) -> str:
    """bcrypt hash for distribution's htpasswd (libc crypt(3); Python 3.11 still has ``crypt``)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))
    if not h or not h.startswith("$2"):
        raise RuntimeError("libc crypt(3) cannot make bcrypt hashes here")
    return h


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, plain HTTP or TLS."""

    def __init__(self, workdir: str | os.PathLike, tls: TLSFiles | None = None,
                 binary: str = "/usr/bin/docker-registry",
                 htpasswd: dict[str, str] | None = None):
        """``htpasswd`` ({user: password}) turns on Basic auth (bcrypt htpasswd file)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.htpasswd = dict(htpasswd or {})
        self.binary = require_binary(binary)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "registry.log"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (what goes in image references)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _config(self) -> str:
        tls = ""
        if self.tls:
            tls = (f"  tls:\n    certificate: {self.tls.server_cert}\n"
                   f"    key: {self.tls.server_key}\n")
        auth = ""
        if self.htpasswd:
            path = self.workdir / "htpasswd"
            path.write_text("".join(f"{u}:{_bcrypt(pw)}\n" for u, pw in self.htpasswd.items()))
            auth = f"auth:\n  htpasswd:\n    realm: regproxy-test\n    path: {path}\n"
        return (
            "version: 0.1\n"
            f"{auth}"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.workdir / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            "http:\n"
            f"  addr: 127.0.0.1:{self.port}\n"
            "  secret: regproxy-test-secret\n"
            f"{tls}"
        )

    def start(self, timeout: float = 15.0) -> LocalRegistry:
        self.port = free_port()
        cfg = self.workdir / "config.yml"
        cfg.write_text(self._config())
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([self.binary, "serve", str(cfg)], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                status, _, _ = self.request("GET", "/v2/")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"docker-registry did not come up on {self.url}:\n{tail}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP API --------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        url = path if path.startswith("http") else self.url + path
        headers = dict(headers or {})
        if self.htpasswd:
            import base64
            user, pw = next(iter(self.htpasswd.items()))
            headers.setdefault("Authorization", "Basic " + base64.b64encode(
                f"{user}:{pw}".encode()).decode())
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        ctx = self.tls.ssl_context() if self.tls else None
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def push_blob(self, name: str, data: bytes) -> str:
        digest = sha256_digest(data)
        status, _, _ = self.request("HEAD", f"/v2/{name}/blobs/{digest}")
        if status == 200:
            return digest
        status, headers, body = self.request("POST", f"/v2/{name}/blobs/uploads/", b"")
        assert status == 202, (status, body)
        loc = headers["Location"]
        if not loc.startswith("http"):
            loc = self.url + loc
        loc += ("&" if "?" in loc else "?") + "digest=" + digest
        status, _, body = self.request("PUT", loc, data,
                                       {"Content-Type": "application/octet-stream"})
        assert status == 201, (status, body)
        return digest

    def push_image(self, name: str, tag: str, image: Image) -> str:
        """Upload blobs and manifest as ``name:tag``; return the manifest digest."""
        for data in image.blobs.values():
            self.push_blob(name, data)
        status, headers, body = self.request("PUT", f"/v2/{name}/manifests/{tag}", image.manifest,
                                             {"Content-Type": image.manifest_type})
        assert status == 201, (status, body)
        assert headers.get("Docker-Content-Digest") == image.digest, headers
        return image.digest

    def manifest_digest(self, name: str, ref: str) -> str | None:
        status, headers, _ = self.request(
            "HEAD", f"/v2/{name}/manifests/{ref}",
            headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"})
        return headers.get("Docker-Content-Digest") if status == 200 else None


# --------------------------------------------------------------------------
# A read-only registry served from memory inside the test's reactor


def static_registry_resource(repos: dict[str, dict[str, Image]], fail_manifest_by_digest: bool = False):
    """A twisted.web resource answering pulls of ``repos`` ({name: {tag: Image}}) from memory.

    For tests that run a server in the reactor and a blocking client in a
    thread.  ``fail_manifest_by_digest`` answers 404 to manifest GETs by
    digest (dockerd then warns and falls back to pulling by tag).
    """
    from twisted.web import resource

    manifests: dict[tuple[str, str], Image] = {}
    blobs: dict[tuple[str, str], bytes] = {}
    for name, tags in repos.items():
        for tag, img in tags.items():
            manifests[(name, tag)] = manifests[(name, img.digest)] = img
            for d, b in img.blobs.items():
                blobs[(name, d)] = b

    class StaticRegistry(resource.Resource):
        isLeaf = True

        def __init__(self):
            super().__init__()
            self.requests: list[tuple[str, str]] = []

        def render_GET(self, request):  # HEAD is answered by render_GET without body
            path = request.path.decode()
            self.requests.append((request.method.decode(), path))
            request.setHeader("Docker-Distribution-API-Version", "registry/2.0")
            if path == "/v2/":
                request.setHeader("Content-Type", "application/json")
                return b"{}"
            m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
            if m:
                name, kind, ref = m.groups()
                if kind == "manifests" and (name, ref) in manifests and not (
                        fail_manifest_by_digest and ref.startswith("sha256:")):
                    img = manifests[(name, ref)]
                    request.setHeader("Content-Type", img.manifest_type)
                    request.setHeader("Docker-Content-Digest", img.digest)
                    return img.manifest
                if kind == "blobs" and (name, ref) in blobs:
                    request.setHeader("Content-Type", "application/octet-stream")
                    request.setHeader("Docker-Content-Digest", ref)
                    return blobs[(name, ref)]
            request.setResponseCode(404)
            request.setHeader("Content-Type", "application/json")
            return json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN" if "manifests" in path
                                           else "BLOB_UNKNOWN", "message": "unknown"}]}).encode()

    return StaticRegistry()
