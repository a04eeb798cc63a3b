"""Makes the ``hub``, ``ghcr`` and ``company`` fixtures available to tests in this directory.

The ``slow`` marker is registered in the project's pytest.ini.
"""

from __future__ import annotations

from tests.upstream.fixtures import company, ghcr, hub  # noqa: F401
