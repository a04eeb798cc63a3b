"""pytest fixtures for the test upstreams: ``hub``, ``ghcr`` and ``company``.

``tests/conftest.py`` loads this module as a plugin, so every test can ask for them
(``tests/upstream/conftest.py`` also imports them, ``from tests.upstream.fixtures
import hub  # noqa: F401``, for runs rooted in that directory).  Then::

    def test_pull(hub):
        image = hub.images["library/alpine:latest"]
        status, headers, body = hub.get(f"/v2/library/alpine/manifests/{image.digest}")
        assert body == image.manifest

Point the proxy at ``X.registry_url`` and trust ``X.ca_pem`` (each upstream has its
own CA).  All three are shared by the whole session and each starts only when a test
first asks for it, so tests must not delete the seeded images; push scratch content
to fresh repository names instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.upstream.hub import Hub
from tests.upstream.registries import CompanyRegistry, GhcrRegistry


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One started, seeded Hub per test session (startup takes a couple of seconds)."""
    with Hub(tmp_path_factory.mktemp("hub")) as started:
        yield started


@pytest.fixture(scope="session")
def ghcr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GhcrRegistry]:
    """One started, seeded ghcr.io-like registry (own token server and realm, no CDN) per session."""
    with GhcrRegistry(tmp_path_factory.mktemp("ghcr")) as started:
        yield started


@pytest.fixture(scope="session")
def company(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompanyRegistry]:
    """One started, seeded company registry (no auth, HTTPS) per session."""
    with CompanyRegistry(tmp_path_factory.mktemp("company")) as started:
        yield started
