"""A loopback TCP forwarder for client tests: refuse the first connections, cut live ones, or terminate TLS."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``. The first ``refuse_first`` connections are closed at once (the
    client sees UNAVAILABLE); :meth:`cut` drops every live connection; with ``tls`` it terminates TLS."""

    def __init__(self, target: str, refuse_first: int = 0, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.refuse_first = refuse_first
        self.tls = tls
        self.connections = 0
        self._live: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                refuse = self.connections <= self.refuse_first
            if refuse:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._live += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every live connection, as a crashing server or a broken network would."""
        with self._lock:
            live, self._live = self._live, []
        for end in live:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()
