"""Makes the ``hub`` fixture available to tests in this directory."""

from __future__ import annotations

from tests.upstream.fixtures import hub  # noqa: F401
