"""Makes the ``hub`` fixture available to tests in this directory."""

from __future__ import annotations

import pytest

from tests.upstream.fixtures import hub  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~30 s (big blobs, real clients)")
