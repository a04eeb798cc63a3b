"""Token policy and JWT signing shared by the token server and :class:`~tests.upstream.hub.Hub`.

Kept separate from the server so the Hub can mint admin tokens locally: seeding and
test helpers then never show up in the token server's request log, which tests use
to assert what the *proxy* asked for.
"""

from __future__ import annotations

import base64
import datetime
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.upstream.pki import libtrust_kid

#: Docker Hub's tokens live 300 s too.
EXPIRES_IN = 300

#: The test users: ``alice`` may pull and push everywhere, ``admin`` may do anything.
USERS: dict[str, str] = {"alice": "wonderland", "admin": "admin"}

#: Repositories under this prefix are not pullable anonymously.
PRIVATE_PREFIX = "private/"


@dataclass(frozen=True)
class Scope:
    """One parsed ``type:name:actions`` scope."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """Parse a scope; the name may itself contain ``:`` (e.g. a registry port).

        Returns None for malformed scopes, which Docker Hub silently ignores.
        """
        parts = text.split(":")
        if len(parts) < 3:
            return None
        actions = tuple(a for a in parts[-1].split(",") if a)
        return cls(type=parts[0], name=":".join(parts[1:-1]), actions=actions)

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def allowed_actions(user: str | None, scope: Scope) -> tuple[str, ...]:
    """The subset of ``scope.actions`` that ``user`` (None = anonymous) gets.

    Like Docker Hub, the token server never refuses a scope: it grants the
    intersection, possibly empty, and lets the registry answer 401/403.
    """
    if user == "admin":
        return scope.actions
    if scope.type != "repository":
        return ()
    if user == "alice":
        allowed = {"pull", "push"}
    elif scope.name.startswith(PRIVATE_PREFIX):
        allowed = set()
    else:
        allowed = {"pull"}
    return tuple(a for a in scope.actions if a in allowed)


def grant(user: str | None, scopes: list[str]) -> list[Scope]:
    """Grant every requested scope as far as the policy allows; drop empty grants.

    Repeated scopes are granted independently (a cross-repo mount needs pull on the
    source and push on the target in the same token).
    """
    granted: list[Scope] = []
    for text in scopes:
        scope = Scope.parse(text)
        if scope is None:
            continue
        actions = allowed_actions(user, scope)
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


@dataclass
class Signer:
    """Signs registry tokens with the token key; the header carries ``x5c`` and ``kid``."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    issuer: str
    service: str
    _x5c: list[str] = field(init=False)
    _kid: str = field(init=False)

    def __post_init__(self) -> None:
        self._x5c = [
            base64.b64encode(
                self.cert.public_bytes(serialization.Encoding.DER)
            ).decode()
        ]
        self._kid = libtrust_kid(self.cert)

    @classmethod
    def from_files(
        cls, key_path: Path, cert_path: Path, issuer: str, service: str
    ) -> Signer:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return cls(key=key, cert=cert, issuer=issuer, service=service)

    def sign(
        self, subject: str | None, access: list[Scope], expires_in: int = EXPIRES_IN
    ) -> str:
        """Return a compact RS256 JWT the distribution registry accepts."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": self.service,
            "exp": now + expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [
                {"type": s.type, "name": s.name, "actions": list(s.actions)}
                for s in access
            ],
        }
        return jwt.encode(
            claims,
            self.key,
            algorithm="RS256",
            headers={"x5c": self._x5c, "kid": self._kid},
        )


def issued_at() -> str:
    """RFC 3339 timestamp as Docker Hub's ``issued_at``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
