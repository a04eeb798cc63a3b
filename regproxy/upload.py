"""Streaming request bodies: blob uploads go upstream as they arrive.

twisted.web reads a whole request body (spooling it to a temporary file above
100 kB) before the resource sees the request; for a multi-GiB layer push that
doubles the time and needs free disk the size of the layer. L{StreamingRequest}
instead dispatches blob-upload requests as soon as their headers are in and
hands each body chunk to an L{UploadBody}, the upstream request's body producer.
When the upstream socket is full, the client socket stops being read.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

from . import errors

_STREAMED_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: Bytes kept while the upstream connection is not ready; past this the client waits.
_EARLY_BUFFER = 1 << 20


class UploadTooLarge(errors.RegistryError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "SIZE_INVALID", f"upload larger than this proxy's limit of {limit} bytes")


#: Bodies that are not blob uploads (manifests, token forms) are small; the
#: distribution registry itself refuses manifests over 4 MiB.
MAX_SMALL_BODY = 4 << 20
#: A token request's form, or a body on a request that takes none.
MAX_FORM_BODY = 64 << 10


def small_body_limit(method: bytes, uri: bytes) -> int:
    """The largest body accepted (held in memory) for a request that is not a blob upload."""
    path = uri.partition(b"?")[0]
    if method == b"PUT" and path.startswith(b"/v2/") and b"/manifests/" in path:
        return MAX_SMALL_BODY
    return MAX_FORM_BODY


class BodyTooLarge(errors.RegistryError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "SIZE_INVALID", f"request body larger than {limit} bytes")


@implementer(IBodyProducer)
class BytesBody:
    """A small in-memory body, written in one go (no cooperator, no reactor turn)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def is_blob_upload(method: bytes, uri: bytes) -> bool:
    """Whether a request (by its request line) carries a blob upload body worth streaming."""
    return method in _STREAMED_METHODS and uri.startswith(b"/v2/") and b"/blobs/uploads/" in uri


@implementer(IBodyProducer)
class UploadBody:
    """A client's request body, produced to the upstream as it arrives.

    @ivar complete: the client has sent the whole body.
    @ivar error: why the body cannot be used (too large, client gone), if so.
    """

    def __init__(self, request: Request, length: int | None, limit: int) -> None:
        self._request = request
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._limit = limit
        self.received = 0
        self.complete = False
        self.error: Exception | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._stopped = False
        self._client_paused = False
        self._saved_timeout: float | None = None
        #: Fires once the client has sent the whole body (the upstream's answer is due then).
        self.whole: Deferred[None] = Deferred()
        #: Set when the upstream's response has arrived (possibly before the whole body).
        self.answered = False
        if limit and length is not None and length > limit:
            self.error = UploadTooLarge(limit)

    # fed by the StreamingRequest

    def feed(self, data: bytes) -> None:
        self.received += len(data)  # counted even when dropped: the channel lingers on what is left
        if self._stopped or self.error is not None:
            return
        if self._limit and self.received > self._limit:
            self._fail(UploadTooLarge(self._limit))
            return
        if self._consumer is not None:
            self._consumer.write(data)
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size >= _EARLY_BUFFER:
            self._pause_client()

    def end(self) -> None:
        self.complete = True
        self.whole.callback(None)
        if self._done is not None and not self._done.called:
            done, self._done = self._done, None
            done.callback(None)

    def client_lost(self, reason: Failure) -> None:
        if not self.complete:
            self._fail(ConnectionError("client disconnected during upload"))

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._early = []
        if self.answered:
            # The upstream has answered already (an early 401/404 while the body
            # was still coming): its request is over, so just stop. Failing the
            # body now would only make Twisted's client log a critical error.
            self.stopProducing()
        elif self._done is not None and not self._done.called:
            done, self._done = self._done, None
            done.errback(error)

    # IBodyProducer, driven by the upstream connection

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self.error is not None:
            return fail(self.error)
        self._consumer = consumer
        early, self._early, self._early_size = self._early, [], 0
        for chunk in early:
            consumer.write(chunk)
        self._resume_client()
        if self.complete:
            return succeed(None)
        self._done = Deferred(lambda d: self.stopProducing())
        return self._done

    def pauseProducing(self) -> None:
        self._pause_client()

    def resumeProducing(self) -> None:
        self._resume_client()

    def stopProducing(self) -> None:
        # The upstream answered before taking the whole body, or went away: the
        # rest of the body has nowhere to go and the connection can't be reused.
        # IBodyProducer: the startProducing Deferred must then never fire.
        self._stopped = True
        self._done = None
        self._resume_client()

    def _pause_client(self) -> None:
        channel = getattr(self._request, "channel", None)
        if not self._client_paused and channel is not None and channel.transport is not None:
            self._client_paused = True
            channel.transport.pauseProducing()
            # The client is silent because we stopped reading it: its idle
            # timeout must not count that against it.
            self._saved_timeout = channel.setTimeout(None)

    def _resume_client(self) -> None:
        channel = getattr(self._request, "channel", None)
        if self._client_paused and channel is not None and channel.transport is not None:
            self._client_paused = False
            channel.setTimeout(self._saved_timeout)
            channel.transport.resumeProducing()


class StreamingRequest(Request):
    """A Request that streams blob-upload bodies and bounds all others.

    twisted.web would spool any body to a temporary file before the resource
    sees it, whatever its size. Here a blob upload streams upstream as it
    arrives; any other body is held in memory up to L{small_body_limit} and
    refused with a 413 as soon as it is known to be larger: by its
    C{Content-Length} before a byte of it is read, or when a chunked body
    passes the limit.

    Relies on the channel having parsed the request line (C{_command}, C{_path},
    C{_version}) when it calls L{gotLength}; if that ever changes, requests are
    simply buffered as twisted.web does by default (a test pins the streaming).

    @ivar upload: the streamed body, or C{None} for ordinary (buffered) requests.
    @ivar body_error: why the body was refused before it was read, if it was.
    """

    upload: UploadBody | None = None
    body_error: errors.RegistryError | None = None
    _body_limit = MAX_FORM_BODY
    _body_size = 0
    _dispatched = False
    #: Upper bound on one upload request's body, 0 for none; set by the Site.
    max_upload_size = 0
    #: The answer's body ends when the connection closes (no length, no chunking).
    close_delimited = False

    def relay_close_delimited(self) -> None:
        """Answer with a body that ends by closing the connection, as the upstream's did."""
        self.close_delimited = True
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def write(self, data: bytes) -> None:
        if self.close_delimited and not self.startedWriting:
            # Request.write would frame the body with chunked encoding, claiming an
            # end the upstream never marked; write the head ourselves, unframed
            # (HTTPChannel.writeHeaders is public). The connection then closes
            # after the body, because of Connection: close.
            self.startedWriting = 1
            self.channel.persistent = False
            self.channel.writeHeaders(self.clientproto, b"%d" % self.code, self.code_message, self.responseHeaders)
        super().write(data)

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        command = getattr(channel, "_command", None)
        path = getattr(channel, "_path", None)
        if command is None or path is None or length == 0:
            super().gotLength(length)
            return
        self.content = BytesIO()
        if is_blob_upload(command, path):
            limit = getattr(getattr(channel, "site", None), "max_upload_size", 0)
            self.upload = UploadBody(self, length, limit)
            self._dispatch_early()
            return
        self._body_limit = small_body_limit(command, path)
        if length is not None and length > self._body_limit:
            self._refuse_body()

    def _refuse_body(self) -> None:
        self.body_error = BodyTooLarge(self._body_limit)
        self.content = BytesIO()
        self._dispatch_early()

    def _dispatch_early(self) -> None:
        """Hand the request to the resource before its body is in.

        On the next reactor turn, not inside the channel's header handling: an
        answer written from here (a 413, a bad name) would come before the
        channel's "100 Continue" and before it has dealt with the rest of the
        bytes it is parsing. Body bytes arriving meanwhile are kept (bounded) by
        the UploadBody, or dropped if the body was refused.
        """
        channel = self.channel
        command = channel._command
        path = channel._path
        version = getattr(channel, "_version", b"HTTP/1.1")
        clock: IReactorTime | None = getattr(getattr(channel, "site", None), "reactor", None)
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        assert clock is not None
        self._dispatched = True
        clock.callLater(0, self._dispatch, command, path, version)

    def _dispatch(self, command: bytes, path: bytes, version: bytes) -> None:
        if getattr(self, "channel", None) is None:
            return  # the client left before we got to it
        super().requestReceived(command, path, version)

    def handleContentChunk(self, data: bytes) -> None:
        if self.upload is not None:
            self.upload.feed(data)
        elif self.body_error is None:
            self._body_size += len(data)
            if self._body_size > self._body_limit:
                self._refuse_body()
            else:
                super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.upload is not None:
            self.upload.end()
        elif self._dispatched:
            self._dispatched = False  # the refused body has ended; the answer is (being) given
        else:
            super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if self.upload is not None:
            self.upload.client_lost(reason)
        super().connectionLost(reason)

    def body_malformed(self) -> None:
        """The channel found the body's chunked framing broken: answer 400 (unless answered already)."""
        error = errors.RegistryError(400, "BLOB_UPLOAD_INVALID" if self.upload else "UNSUPPORTED", "malformed chunked request body")
        if self.upload is not None:
            self.upload._fail(error)
        elif not self.startedWriting:
            self.body_error = error

    def body_pending(self) -> bool:
        """Whether part of the request body is still unread (the connection can't be reused)."""
        if self.upload is not None:
            return not self.upload.complete
        return self._dispatched
