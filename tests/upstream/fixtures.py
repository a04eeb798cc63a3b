"""pytest fixture for the Docker-Hub-like upstream.

Import it into a conftest (``from tests.upstream.fixtures import hub  # noqa: F401``), then::

    def test_pull(hub):
        image = hub.images["library/alpine:latest"]
        status, headers, body = hub.get(f"/v2/library/alpine/manifests/{image.digest}")
        assert body == image.manifest

Point the proxy at ``hub.registry_url`` and trust ``hub.ca_pem``.  The Hub is shared by
the whole session, so tests must not delete the seeded images; push scratch content
to fresh repository names instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.upstream.hub import Hub


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One started, seeded Hub per test session (startup takes a couple of seconds)."""
    with Hub(tmp_path_factory.mktemp("hub")) as started:
        yield started
