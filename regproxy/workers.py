"""Several regproxy processes sharing the listening ports, one per core.

One Python process uses one core. With C{--workers N} the first process binds
every C{--listen} endpoint with C{SO_REUSEPORT}, then starts N-1 copies of
itself bound to the same ports; the kernel spreads new connections across them.
Each worker is a complete, independent proxy (the proxy keeps no shared state
that matters: the learnt token realm is re-learnt per process).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

_reuse_port_enabled = False


def enable_reuse_port() -> None:
    """Make every TCP listening socket of this process set C{SO_REUSEPORT} before binding.

    Endpoint descriptions have no reuse-port option, so the one place every
    C{tcp:}/C{ssl:} listener passes through is patched, once, in worker mode only.
    """
    global _reuse_port_enabled
    if _reuse_port_enabled:
        return
    original = tcp.Port.createInternetSocket

    def create(self: tcp.Port) -> socket.socket:
        s: socket.socket = original(self)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s

    tcp.Port.createInternetSocket = create  # type: ignore[method-assign]
    _reuse_port_enabled = True


def with_port(description: str, port: int) -> str:
    """C{tcp:0:interface=x} -> C{tcp:<port>:interface=x}: the workers bind the port the first process got."""
    kind, _, rest = description.partition(":")
    fields = rest.split(":")
    for i, field in enumerate(fields):
        if field.startswith("port="):
            fields[i] = f"port={port}"
            return f"{kind}:{':'.join(fields)}"
    fields[0] = str(port)
    return f"{kind}:{':'.join(fields)}"


class Listener(Service):
    """Listen on one endpoint description and remember the port (its number is needed by workers).

    A failure to bind is raised from C{startService}, so a bad C{--listen} stops
    the start-up instead of leaving a half-listening proxy.
    """

    def __init__(self, reactor: Any, description: str, factory: Factory[Any]) -> None:
        self._reactor = reactor
        self.description = description
        self._factory: Any = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        results: list[Any] = []
        serverFromString(self._reactor, self.description).listen(self._factory).addBoth(results.append)
        if results and isinstance(results[0], Failure):
            results[0].raiseException()
        if not results:
            raise RuntimeError(f"listening on {self.description} did not complete synchronously")
        self.port = results[0]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()  # type: ignore[return-value]
        return None

    def bound_description(self) -> str:
        assert self.port is not None
        return with_port(self.description, self.port.getHost().port)  # type: ignore[attr-defined]


class _Worker(ProcessProtocol):
    """One extra worker process; C{exited} fires when it ends."""

    def __init__(self) -> None:
        self.exited: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.started = 0.0
        self.pid = 0

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason  # a Failure handed to callback() would count as an error
        self.exited.callback(None)


class WorkerSupervisor(Service):
    """Starts the other workers once the listeners are bound; restarts one that dies."""

    log = Logger()

    def __init__(
        self, reactor: Any, listeners: Sequence[Listener], count: int, child_args: Callable[[list[str]], list[str]]
    ) -> None:
        self._reactor = reactor
        self._listeners = listeners
        self._count = count
        self._child_args = child_args
        self._workers: dict[_Worker, Any] = {}
        #: Restart delay: doubled for a worker that dies young, back to 1 s for one that ran a while.
        self._backoff = 1.0

    def startService(self) -> None:
        super().startService()
        for _ in range(self._count - 1):
            self._spawn()

    def _argv(self) -> list[str]:
        twist_args = _twist_options(sys.argv)
        listen = [listener.bound_description() for listener in self._listeners]
        return [sys.executable, "-m", "twisted", *twist_args, "regproxy", *self._child_args(listen)]

    def _spawn(self) -> None:
        if not self.running:
            return
        worker = _Worker()
        argv = self._argv()
        transport = self._reactor.spawnProcess(
            worker, argv[0], argv, env=dict(os.environ), path=os.getcwd(), childFDs={0: "w", 1: 1, 2: 2}
        )
        self._workers[worker] = transport
        worker.started = self._reactor.seconds()
        worker.pid = transport.pid
        worker.exited.addCallback(self._ended, worker)
        self.log.info("started worker process {pid}", pid=transport.pid)

    def _ended(self, _: None, worker: _Worker) -> None:
        self._workers.pop(worker, None)
        from .metrics import mark_worker_dead

        mark_worker_dead(worker.pid)
        if self.running:
            why = worker.reason.getErrorMessage() if worker.reason else "?"
            lived = self._reactor.seconds() - worker.started
            self._backoff = 1.0 if lived > 60 else min(self._backoff * 2, 30.0)
            self.log.warn("worker process ended ({why}); starting another in {delay:g}s", why=why, delay=self._backoff)
            self._reactor.callLater(self._backoff, self._spawn)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for transport in self._workers.values():
            try:
                transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
        exits = [worker.exited for worker in self._workers]
        return gatherResults(exits).addCallback(lambda _: None) if exits else None


def _twist_options(argv: list[str]) -> list[str]:
    """The C{twist} options (e.g. C{--log-format}) this process was started with."""
    if "regproxy" in argv:
        return argv[1 : argv.index("regproxy")]
    return []
