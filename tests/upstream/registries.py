"""More upstream shapes next to the Hub: a ghcr.io-like registry and a company registry.

Both are :class:`~tests.upstream.hub.Registry` instances with their own processes,
ports, PKI (so their own :attr:`~tests.upstream.hub.Registry.ca_pem`) and logs, so
they run alongside the Hub in one session:

* :class:`GhcrRegistry`: token auth from a token server of its own, under a service,
  issuer, signing key and realm path (``/ghcr-token``) unlike the Hub's; no CDN, the
  registry serves blobs itself.  Same policy and users as the Hub: anonymous pull
  except ``private/``, ``alice``/``wonderland`` pulls and pushes everywhere.
* :class:`CompanyRegistry`: no auth at all (``/v2/`` answers 200 to anyone), HTTPS,
  no CDN.

Seeded images use seeds of their own, so no digest is shared with the Hub's
(``private/secret:latest`` exists on both, with different content).
"""

from __future__ import annotations

from dataclasses import replace

from tests.upstream import images as img
from tests.upstream.hub import Registry


class GhcrRegistry(Registry):
    """ghcr.io stand-in: ``with GhcrRegistry(workdir) as ghcr: ...``.

    Seeds ``owner/img:1`` (OCI manifest; ``owner/img:latest`` is the same),
    ``owner/tool:latest`` (Docker manifest), ``owner/multi:latest`` (OCI index,
    linux/amd64 and linux/arm64/v8) and ``private/secret:latest`` (alice only).
    """

    service = "ghcr.test"
    issuer = "ghcr-test-auth"
    token_path = "/ghcr-token"
    token_auth = True
    cdn = False
    label = "ghcr"

    def seed_images(self) -> None:
        p = self.platform
        image = img.make_image(
            "owner/img", "1", seed="ghcr/owner/img", platform=p, oci=True
        )
        self.push(image)
        self.push(replace(image, tag="latest"))
        self.push(
            img.make_image("owner/tool", "latest", seed="ghcr/owner/tool", platform=p)
        )
        children = [
            img.make_image(
                "owner/multi",
                "latest",
                seed="ghcr/owner/multi",
                platform=plat,
                oci=True,
            )
            for plat in ("linux/amd64", "linux/arm64/v8")
        ]
        self.push(img.make_index("owner/multi", "latest", children, oci=True))
        self.push(
            img.make_image(
                "private/secret", "latest", seed="ghcr/private/secret", platform=p
            )
        )


class CompanyRegistry(Registry):
    """A company's own registry without auth: ``with CompanyRegistry(workdir) as company: ...``.

    :attr:`service` and :attr:`token_realm` are "", :attr:`users` is empty and
    :meth:`token_log` stays empty.  Seeds ``team/app:1.0`` and ``team/base:2``
    (Docker manifests).
    """

    service = ""
    issuer = ""
    token_auth = False
    cdn = False
    label = "company"

    def seed_images(self) -> None:
        p = self.platform
        self.push(
            img.make_image("team/app", "1.0", seed="company/team/app", platform=p)
        )
        self.push(
            img.make_image("team/base", "2", seed="company/team/base", platform=p)
        )
