"""An OCI index as BuildKit pushes it: platform images plus attestation manifests.

``docker buildx build --push`` (provenance/SBOM on, the default since BuildKit
0.11) pushes, for each platform image, an attestation manifest next to it in the
index: an OCI image manifest whose config says ``unknown/unknown`` and whose
layers are in-toto statements, listed with ``platform: unknown/unknown`` and the
annotations ``vnd.docker.reference.type: attestation-manifest`` and
``vnd.docker.reference.digest: <the image's digest>``.  Clients must skip those
entries when choosing a platform, and a cache must store and serve the index
byte for byte like any other.

:func:`make_attested_index` builds one; :func:`seed_attested` pushes it into a
:class:`~tests.upstream.hub.Registry` once per session (idempotent), under a
repository name of its own so no seeded image changes.
"""

from __future__ import annotations

import json
from typing import Any

from tests.upstream import images as img
from tests.upstream.hub import Registry
from tests.upstream.images import Blob, SeededImage

IN_TOTO = "application/vnd.in-toto+json"
ATTESTATION_TYPE = "attestation-manifest"
#: The repository :func:`seed_attested` pushes to, by default.
ATTESTED_REPOSITORY = "mcache/attested"


def make_attestation(repository: str, tag: str, image: SeededImage) -> SeededImage:
    """BuildKit's attestation manifest for ``image``: unknown/unknown config, one in-toto SPDX layer."""
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [
            {
                "name": f"pkg:docker/{repository}@{tag}?platform={image.platform.replace('/', '%2F')}",
                "digest": {"sha256": image.digest.split(":", 1)[1]},
            }
        ],
        "predicate": {"spdxVersion": "SPDX-2.3", "name": f"sbom-{image.platform}", "packages": []},
    }
    data = json.dumps(statement, indent=2, sort_keys=True).encode()
    layer = Blob(img.sha256_digest(data), len(data), IN_TOTO, data=data)
    config = json.dumps(
        {
            "architecture": "unknown",
            "os": "unknown",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        },
        sort_keys=True,
    ).encode()
    config_digest = img.sha256_digest(config)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": img.OCI_MANIFEST,
        "config": {"mediaType": img.OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [
            {
                "mediaType": IN_TOTO,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"},
            }
        ],
    }
    manifest = json.dumps(doc, indent=3).encode()
    return SeededImage(
        repository=repository,
        tag=tag,
        digest=img.sha256_digest(manifest),
        media_type=img.OCI_MANIFEST,
        manifest=manifest,
        config_digest=config_digest,
        config=config,
        layers=(layer,),
        platform="unknown/unknown",
    )


def make_attested_index(
    repository: str, tag: str, *, seed: str, platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64/v8")
) -> SeededImage:
    """An OCI index over one OCI image per platform, each followed by its attestation manifest.

    :attr:`SeededImage.platforms` holds the images under their platform and the
    attestations under ``"attestation:<platform>"``; :attr:`SeededImage.children`
    lists every entry's digest in index order.
    """
    entries: list[dict[str, Any]] = []
    children: dict[str, SeededImage] = {}
    for platform in platforms:
        image = img.make_image(repository, tag, seed=f"{seed}/{platform}", platform=platform, oci=True)
        attestation = make_attestation(repository, tag, image)
        os_, _, rest = platform.partition("/")
        arch, _, variant = rest.partition("/")
        plat: dict[str, str] = {"architecture": arch, "os": os_}
        if variant:
            plat["variant"] = variant
        entries.append({"mediaType": image.media_type, "digest": image.digest, "size": image.size, "platform": plat})
        entries.append(
            {
                "mediaType": attestation.media_type,
                "digest": attestation.digest,
                "size": attestation.size,
                "annotations": {
                    "vnd.docker.reference.digest": image.digest,
                    "vnd.docker.reference.type": ATTESTATION_TYPE,
                },
                "platform": {"architecture": "unknown", "os": "unknown"},
            }
        )
        children[platform] = image
        children[f"attestation:{platform}"] = attestation
    manifest = json.dumps({"schemaVersion": 2, "mediaType": img.OCI_INDEX, "manifests": entries}, indent=3).encode()
    return SeededImage(
        repository=repository,
        tag=tag,
        digest=img.sha256_digest(manifest),
        media_type=img.OCI_INDEX,
        manifest=manifest,
        children=tuple(e["digest"] for e in entries),
        platforms=children,
        platform="",
    )


def seed_attested(registry: Registry, repository: str = ATTESTED_REPOSITORY, tag: str = "latest") -> SeededImage:
    """Push the attested index (children, blobs, then the index) unless this registry already has it."""
    existing = registry.images.get(f"{repository}:{tag}")
    if existing is not None:
        return existing
    return registry.push(make_attested_index(repository, tag, seed=repository))
