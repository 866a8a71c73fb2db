"""A TCP proxy for fault tests: sits between the service and ClickHouse and can refuse
connections, hang requests that match a pattern, or cut responses mid-stream."""
import socket
import threading
import time


class FaultProxy:
    """Modes: "pass", "refuse" (close at once), "hang" (requests containing `pattern` are never
    forwarded), "cut" (responses to requests containing `pattern` are cut after `cut_after` bytes),
    "http500" (requests containing `pattern` get a ClickHouse-style HTTP 500 instead),
    "drop" (the connection is closed instead of forwarding a message containing `pattern`) and
    "drop_after" (the message is forwarded, then the connection is closed before any answer:
    e.g. a PostgreSQL COMMIT that the server carries out while the client sees a broken
    connection). `arm(mode, times)` applies a mode to the next `times` matches only."""

    def __init__(self, upstream_port, host="127.0.0.1", tls=None):
        """`tls`: an `ssl.SSLContext` (server side) to terminate HTTPS in front of the upstream."""
        self.upstream = (host, upstream_port)
        self.tls = tls
        self._mode = "pass"
        self.pattern = b"ArrowStream"
        self.cut_after = 4096
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{'localhost' if tls else host}:{self.port}"
        self.matched = 0
        self.armed = 0
        self._open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode, times=1):
        """Faults the next `times` messages containing `pattern` with `mode`, then passes."""
        self.armed = times
        self._mode = mode

    def _take(self):
        """The mode for a message that matched: an armed fault is used up once."""
        mode = self._mode
        if self.armed:
            self.armed -= 1
            if self.armed == 0:
                self._mode = "pass"
        return mode

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = value
        if value == "refuse":
            # Kept-alive connections would otherwise carry on: drop them all.
            self._close_open()

    def _close_open(self):
        for s in self._open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._open = []

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            if self.tls:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except OSError:
                    client.close()
                    continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            state = {"hang": False, "cut": False, "sent": 0}
            self._open += [client, server]
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client, server, state):
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if self.pattern in data and self.mode in ("hang", "cut", "http500", "drop", "drop_after"):
                    self.matched += 1
                    mode = self._take()
                    if mode in ("drop", "drop_after"):
                        if mode == "drop_after":
                            server.sendall(data)
                            time.sleep(0.05)  # let the server read it before the connection goes
                        for sock in (client, server):
                            try:
                                sock.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                        break
                    if mode == "hang":
                        state["hang"] = True
                        continue  # swallowed: the server never sees it
                    if mode == "http500":
                        body = b"Code: 999. DB::Exception: injected server failure. (KEEPER_EXCEPTION)\n"
                        client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nX-ClickHouse-Exception-Code: 999\r\n"
                                       b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                        client.shutdown(socket.SHUT_RDWR)
                        break
                    state["cut"] = True
                if not state["hang"]:
                    server.sendall(data)
        except OSError:
            pass
        # The client is gone: pass its end-of-stream on, or the server keeps the connection
        # (PostgreSQL runs out of connection slots after a few hundred runs).
        try:
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _down(self, server, client, state):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if state["cut"]:
                    room = self.cut_after - state["sent"]
                    if room <= 0:
                        break
                    data = data[:room]
                state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.sock.close()
        self._close_open()
