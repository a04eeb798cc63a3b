"""pytest fixture for the Docker-Hub-like upstream.

Use from a conftest with ``from tests.upstream.fixtures import hub  # noqa: F401``.
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
