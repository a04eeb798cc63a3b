#!/opt/regproxy/bin/python
"""Container health check: exit 0 when regproxy's /healthz answers 200, else 1.

Used by packaging/Dockerfile's HEALTHCHECK (installed as
/opt/regproxy/bin/regproxy-healthcheck). The URL is REGPROXY_HEALTHCHECK_URL,
default http://127.0.0.1:5000/healthz. Only the standard library: no curl in
the image. Environment proxies (http_proxy, ...) are ignored: the check is
about this container's own listener.
"""

import os
import sys
import urllib.request

URL = os.environ.get("REGPROXY_HEALTHCHECK_URL", "http://127.0.0.1:5000/healthz")


def main() -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(URL, timeout=float(os.environ.get("REGPROXY_HEALTHCHECK_TIMEOUT", "4"))) as response:
            body = response.read(64)
            status = response.status
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {URL}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {URL}: HTTP {status}", file=sys.stderr)
        return 1
    print(f"healthy: {URL}: {body.decode(errors='replace').strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
