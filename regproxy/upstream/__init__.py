"""The upstream side: the configured registries, how to reach them, the proxy's own tokens."""

from .client import Upstream, ascii_url, discard, policy_for, read_bounded
from .endpoints import OriginEndpoints

__all__ = ["OriginEndpoints", "Upstream", "ascii_url", "discard", "policy_for", "read_bounded"]
