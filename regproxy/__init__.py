"""regproxy: a streaming Docker/OCI registry proxy on Twisted."""

__version__ = "0.1.0"
