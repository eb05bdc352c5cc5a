"""gunicorn's gevent worker, with aspy's error answers, read deadlines and room for /health.

gunicorn answers some requests before the app sees them: one it cannot parse (a malformed
request line or header, ``Content-Length`` beside ``Transfer-Encoding``, a transfer-coding
that does not end in ``chunked``) gets 400, 414, 431 or 501, and an error that breaks a
response before its first byte gets 500. gunicorn writes those as HTML pages; in aspy's
workers they are JSON in Anthropic's shape, like every other answer aspy makes.

Capacity: each worker serves ``worker_connections`` connections for the proxy, and keeps
:data:`RESERVE` more so that ``/health`` and ``/metrics`` are answered when those are all
taken; a proxy request that arrives while they are gets 529 ``overloaded_error`` at once
(the SDKs retry it) instead of waiting unseen in the listen queue. A new connection must
send its request headers within ``read_timeout`` seconds, and within :data:`CROWDED_READ`
while the worker is full, so that clients that open connections and send nothing (or a
byte now and then) cannot hold the slots. Later requests on a kept-alive connection may
wait ``keepalive`` seconds, as gunicorn has it.

A graceful stop (TERM, or a reload) loses no request a client has sent: the worker takes
the connections already waiting in the listen queue before it closes the socket (closing
it would reset them), answers every request that arrives with ``Connection: close``, and
closes kept-alive connections that sit idle (for :data:`IDLE_AT_STOP`) rather than after
``keepalive``.

Each worker has glibc give large blocks back when they are freed
(:func:`give_back_large_blocks`), so that a burst of large request bodies does not stay in
its memory.

gunicorn's master imports this module to find the worker class, before any worker has
patched the standard library: it imports gunicorn's gevent worker (which the master loads
anyway) and nothing of the app.
"""
from __future__ import annotations

import ctypes
import os
import socket
import time
from functools import partial

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from .native import native, readable

# Connections kept beyond worker_connections for the host's monitoring.
RESERVE = 64
# Paths served from the reserve: liveness and metrics, never the proxy or the API.
MONITORING = frozenset({"/health", "/metrics"})
# Seconds a new connection has for its headers while the worker is full.
CROWDED_READ = 2.0
# How long a refused client's unread body is drained, so that it reads the answer and not a reset.
DRAIN = 2.0
# On a graceful stop, a kept-alive connection idle this long is closed: a client in the middle of
# its work sends its next request sooner, and gets it answered (with Connection: close).
IDLE_AT_STOP = 1.0


def write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Write gunicorn's own error answer as JSON in Anthropic's shape (in place of its HTML page)."""
    # The parameters keep gunicorn's names: this replaces its util.write_error.
    # The app is loaded in the worker by now, so this imports nothing new.
    from .errors import error_body, error_type

    body = error_body(error_type(status_int), mesg or reason)
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


def close_lingering(sock) -> None:
    """Close after the answer is out: stop writing, read what the client still sends, then close.

    Closing a socket with unread bytes in it sends a reset, which can destroy the answer
    before the client reads it.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        # gevent documents False as 'suppress the timeout'; types-gevent allows only exceptions.
        with gevent.Timeout(DRAIN, False):  # type: ignore[arg-type]
            while sock.recv(65536):
                pass
    except OSError:
        pass


class ClosedListener:
    """What gunicorn asks of a listener, for the connections taken from it just before it closed."""

    def __init__(self, listener):
        self.name = listener.getsockname()

    def getsockname(self):
        """Return the address the listener had."""
        return self.name


# glibc's mallopt parameter for the size from which a block is mapped on its own.
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 128 * 1024


def give_back_large_blocks() -> None:
    """Have glibc map every block of 128 KiB or more on its own, so that freeing it gives the memory back.

    glibc raises that threshold each time it frees such a block, up to 32 MiB: after a burst of
    Claude Code turns (request bodies of hundreds of KB) the bodies then live in the heap,
    which keeps its high-water mark. Fixed, a worker's memory falls back after the burst
    (bench/run, W3 after W2: 222 -> 194 MiB for all processes). Elsewhere than glibc, nothing.
    """
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)
    except (OSError, AttributeError):
        pass


class AspyWorker(GeventWorker):
    """gunicorn's gevent worker: Anthropic-shaped errors, read deadlines, a reserve for /health."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The pool is sized from this: the proxy's slots plus the reserve.
        self.proxy_slots = self.worker_connections
        self.worker_connections = self.proxy_slots + RESERVE
        self.connections = 0
        # Seconds each connection still waiting for its first request has for the headers.
        self.first_deadline: dict = {}
        # The client socket of each connection, and of those kept alive waiting for a request.
        self.client_of: dict = {}
        self.idle: dict = {}

    def init_process(self) -> None:
        """Swap gunicorn's error page for aspy's in this worker process, then run as usual."""
        # gunicorn writes every error answer through util.write_error; nothing else calls it.
        util.write_error = write_error
        give_back_large_blocks()
        super().init_process()

    @property
    def full(self) -> bool:
        """Tell whether the proxy's slots are all taken."""
        return self.connections > self.proxy_slots

    def read_timeout(self) -> float:
        """Return ``[server] read_timeout`` from the app this worker loaded."""
        config = getattr(self.wsgi, "config", {}).get("ASPY")
        return config.server.read_timeout if config is not None else 30.0

    def run(self) -> None:
        """Serve until told to stop, then stop without resetting any request already sent.

        gunicorn's gevent worker closes its listening socket at once, which resets the
        connections waiting in its queue, and waits out idle kept-alive connections.
        """
        servers: list[StreamServer] = []
        pools: list[Pool] = []
        for listener in self.sockets:
            listener.setblocking(True)
            pool = Pool(self.worker_connections)
            server = StreamServer(listener, handle=partial(self.handle, listener), spawn=pool)
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            servers.append(server)
            pools.append(pool)
        while self.alive:
            self.notify()
            gevent.sleep(1.0)
        for listener, server, pool in zip(self.sockets, servers, pools):
            server.stop_accepting()
            self.take_queued(listener, pool)
            server.close()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while any(pool.free_count() != pool.size for pool in pools):
            if time.monotonic() > deadline:
                self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                for server in servers:
                    server.stop(timeout=1)
                return
            self.close_idle()
            self.notify()
            gevent.sleep(0.1)

    def take_queued(self, listener, pool: Pool) -> None:
        """Serve the connections already in the listen queue, which closing the socket would reset."""
        # Never wait: another worker may take a queued connection first.
        listener.settimeout(0.0)
        closed = ClosedListener(listener)
        while readable(listener):
            try:
                client, addr = listener.accept()
            except OSError:
                return  # another worker took it
            pool.spawn(self.handle, closed, client, addr)

    def close_idle(self) -> None:
        """Close kept-alive connections that have waited a while for a request with none arriving."""
        now = time.monotonic()
        for client, since in list(self.idle.values()):
            if now - since > IDLE_AT_STOP and not readable(client):
                try:
                    # The parser then reads the end and closes the connection, as when a client
                    # leaves. Through a twin: gevent's own shutdown fails the waiting read instead.
                    with native("socket", "socket")(fileno=os.dup(client.fileno())) as twin:
                        twin.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def handle(self, listener, client, addr) -> None:
        """Serve one connection, counted, its first request due sooner while the worker is full."""
        me = gevent.getcurrent()
        self.connections += 1
        self.first_deadline[me] = CROWDED_READ if self.full else self.read_timeout()
        self.client_of[me] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self.connections -= 1
            self.first_deadline.pop(me, None)
            self.idle.pop(me, None)
            self.client_of.pop(me, None)

    def timeout_ctx(self):
        """Return the deadline for the next request's headers: the first request's, or keep-alive's."""
        me = gevent.getcurrent()
        if me in self.first_deadline:
            return gevent.Timeout(self.first_deadline[me], False)
        self.idle[me] = (self.client_of[me], time.monotonic())
        return gevent.Timeout(self.cfg.keepalive, False)

    def handle_request(self, listener_name, req, sock, addr):
        """Serve a request; refuse a proxy request with 529 while the proxy's slots are all taken."""
        me = gevent.getcurrent()
        self.first_deadline.pop(me, None)
        self.idle.pop(me, None)
        if self.full and req.path not in MONITORING:
            write_error(sock, 529, "Overloaded",
                        f"aspy is serving as many connections as it may (worker_connections = "
                        f"{self.proxy_slots} per worker); retry shortly")
            close_lingering(sock)
            raise StopIteration()
        return super().handle_request(listener_name, req, sock, addr)
