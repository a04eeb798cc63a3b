"""Upstream registries on loopback, for regproxy's integration tests.

See :mod:`tests.upstream.hub` for the Docker-Hub-like one and the shared machinery,
:mod:`tests.upstream.registries` for the ghcr.io-like and company ones, and
:mod:`tests.upstream.fixtures` for the pytest fixtures.
"""
