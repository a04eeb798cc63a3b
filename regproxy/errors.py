"""OCI error responses produced by the proxy itself.

Clients (docker, containerd, skopeo) print the ``message`` of the first entry of
``{"errors": [...]}``; anything else (HTML, tracebacks) surfaces as a confusing
"invalid character" error, so every answer the proxy invents goes through here.
"""

from __future__ import annotations

import json

from twisted.web.http_headers import Headers
from twisted.web.server import Request

#: Headers every registry answer carries; some clients refuse answers without it.
API_VERSION_HEADER = (b"Docker-Distribution-API-Version", [b"registry/2.0"])


class RegistryError(Exception):
    """An error the proxy answers with itself, as OCI error JSON.

    Raised anywhere below the resource; the resource turns it into a response.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: object = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        #: Extra response headers that belong to this answer (C{Allow}, C{Retry-After}).
        self.headers = headers or {}

    def body(self) -> bytes:
        """The OCI error document for this error."""
        return error_body(self.code, self.message, self.detail)


def error_body(code: str, message: str, detail: object = None) -> bytes:
    """Serialise one OCI error entry as C{{"errors":[{code,message,detail}]}}."""
    entry: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode("utf-8")


#: Headers set on a request before its answer was decided that still hold for an error.
_KEPT_ON_ERROR = (
    b"server",
    b"date",
    b"connection",
    b"vary",
    b"access-control-allow-origin",
    b"access-control-expose-headers",
)


def write_error(request: Request, error: RegistryError) -> None:
    """Answer C{request} with C{error} and finish it (body omitted for HEAD by twisted.web).

    The headers start afresh: whatever an upstream answer had put there
    (C{Content-Range}, a digest, its length) describes another response.
    """
    body = error.body()
    old = request.responseHeaders
    request.responseHeaders = Headers()
    for name in _KEPT_ON_ERROR:
        values = old.getRawHeaders(name)
        if values:
            request.responseHeaders.setRawHeaders(name, values)
    for name, values in error.headers.items():
        request.responseHeaders.setRawHeaders(name, values)
    request.setResponseCode(error.status)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
    request.responseHeaders.setRawHeaders(*API_VERSION_HEADER)
    request.write(body)
    request.finish()


def name_invalid(name: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", f"invalid repository name: {name!r}")


def digest_invalid(digest: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", f"invalid digest: {digest!r}")


def tag_invalid(tag: str) -> RegistryError:
    return RegistryError(400, "TAG_INVALID", f"invalid tag or reference: {tag!r}")


def unsupported(message: str, status: int = 404) -> RegistryError:
    return RegistryError(status, "UNSUPPORTED", message)
