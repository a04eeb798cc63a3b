"""A Docker-Hub-like upstream registry on loopback, for regproxy's integration tests.

See :mod:`tests.upstream.hub` for the entry point and :mod:`tests.upstream.fixtures`
for the pytest fixture.
"""
