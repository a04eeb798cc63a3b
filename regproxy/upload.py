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
        #: Fires once the client has sent the whole body (the upstream's answer is due then).
        self.whole: Deferred[None] = Deferred()
        #: Set when the upstream's response has arrived (possibly before the whole body).
        self.answered = False
        if limit and length is not None and length > limit:
            self.error = UploadTooLarge(limit)

    # fed by the StreamingRequest

    def feed(self, data: bytes) -> None:
        if self._stopped or self.error is not None:
            return
        self.received += len(data)
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

    def _resume_client(self) -> None:
        channel = getattr(self._request, "channel", None)
        if self._client_paused and channel is not None and channel.transport is not None:
            self._client_paused = False
            channel.transport.resumeProducing()


class StreamingRequest(Request):
    """A Request that streams blob-upload bodies instead of buffering them.

    Relies on the channel having parsed the request line (C{_command}, C{_path},
    C{_version}) when it calls L{gotLength}; if that ever changes, requests are
    simply buffered as twisted.web does by default (a test pins the streaming).

    @ivar upload: the streamed body, or C{None} for ordinary (buffered) requests.
    """

    upload: UploadBody | None = None
    #: Upper bound on one upload request's body, 0 for none; set by the Site.
    max_upload_size = 0

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        command = getattr(channel, "_command", None)
        path = getattr(channel, "_path", None)
        version = getattr(channel, "_version", None)
        if command is None or path is None or length == 0 or not is_blob_upload(command, path):
            super().gotLength(length)
            return
        limit = getattr(getattr(channel, "site", None), "max_upload_size", 0)
        self.content = BytesIO()
        self.upload = UploadBody(self, length, limit)
        # Dispatch on the next reactor turn, not inside the channel's header
        # handling: an answer written from here (a 413, a bad name) would come
        # before the channel's "100 Continue" and before it has dealt with the
        # rest of the bytes it is parsing. Body bytes arriving meanwhile are kept
        # (bounded) by the UploadBody.
        clock: IReactorTime | None = getattr(getattr(channel, "site", None), "reactor", None)
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        assert clock is not None
        clock.callLater(0, self._dispatch, command, path, version)

    def _dispatch(self, command: bytes, path: bytes, version: bytes) -> None:
        if getattr(self, "channel", None) is None:
            return  # the client left before we got to it
        super().requestReceived(command, path, version)

    def handleContentChunk(self, data: bytes) -> None:
        if self.upload is None:
            super().handleContentChunk(data)
        else:
            self.upload.feed(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.upload is None:
            super().requestReceived(command, path, version)
        else:
            self.upload.end()

    def connectionLost(self, reason: Failure) -> None:
        if self.upload is not None:
            self.upload.client_lost(reason)
        super().connectionLost(reason)

    def body_pending(self) -> bool:
        """Whether part of the request body is still unread (the connection can't be reused)."""
        return self.upload is not None and not self.upload.complete
