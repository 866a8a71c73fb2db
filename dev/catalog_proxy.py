"""An HTTP proxy in front of a REST catalog that makes commits fail the way real networks
and catalogs do (tests and soak only; it runs outside the service, as a load balancer or a
flaky gateway would).

Each commit (`POST /v1/namespaces/{ns}/tables/{table}`) takes the next fault from a queue;
with the queue empty it passes. Faults:

- ``("504_then_apply", delay)``  answer 504 at once, forward the request `delay` s later (it applies);
- ``("drop_then_apply", delay)`` close the connection without an answer, forward `delay` s later;
- ``("504", None)``              answer 504, never forward (nothing applies);
- ``("drop", None)``             close the connection without an answer, never forward;
- ``("slow", delay)``            forward at once (it applies), hold the answer `delay` s (the
                                 client gives up first);
- ``("hang", None)``             never forward, never answer (until the client goes away);
- ``("504_then_apply_before_next", None)``  answer 504 at once, and forward the request just
                                 before the next commit is forwarded (a gateway that queued it):
                                 the late commit always wins over the retry that follows it.

Every other request passes through unchanged. `applied_late` counts requests forwarded late.
"""
import collections
import http.client
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("504_then_apply", "drop_then_apply", "504", "drop", "slow", "hang", "504_then_apply_before_next")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients killed mid-request (the soak's SIGKILLs) are expected


class CatalogProxy:
    def __init__(self, upstream_url, host="127.0.0.1"):
        u = urllib.parse.urlparse(upstream_url)
        self.upstream = (u.hostname, u.port)
        self.faults = collections.deque()
        self.lock = threading.Lock()
        self.commits = 0
        self.faulted = []
        self.late = []  # threads forwarding late requests
        self.held = []  # requests to forward before the next commit
        self.hang_all = False
        self.server = _QuietServer((host, 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def push(self, kind, delay=None):
        with self.lock:
            self.faults.append((kind, delay))

    def next_fault(self):
        with self.lock:
            self.commits += 1
            if self.hang_all:
                return ("hang", None)
            return self.faults.popleft() if self.faults else ("pass", None)

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = (resp.status, resp.reason, [(k, v) for k, v in resp.getheaders() if k.lower() != "transfer-encoding"], data)
        conn.close()
        return out

    def forward_later(self, method, path, headers, body, delay):
        def go():
            time.sleep(delay)
            try:
                self.forward(method, path, headers, body)
            except OSError:
                pass
        t = threading.Thread(target=go, daemon=True)
        t.start()
        self.late.append(t)

    def release_held(self):
        """Forwards the requests held for the next commit, in order (they apply)."""
        with self.lock:
            held, self.held = self.held, []
        for method, path, headers, body in held:
            try:
                self.forward(method, path, headers, body)
            except Exception:  # noqa: BLE001 - a late commit that fails is one that never applied
                pass

    def settle(self, timeout=30):
        """Waits until every late request has been forwarded (held ones too)."""
        self.release_held()
        for t in list(self.late):
            t.join(timeout)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def route(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
                is_commit = self.command == "POST" and len(parts) == 5 and parts[1] == "namespaces" and parts[3] == "tables"
                if is_commit:
                    proxy.release_held()
                kind, delay = proxy.next_fault() if is_commit else ("pass", None)
                if kind != "pass":
                    proxy.faulted.append(kind)
                if kind == "504_then_apply_before_next":
                    with proxy.lock:
                        proxy.held.append((self.command, self.path, headers, body))
                if kind in ("504_then_apply", "drop_then_apply"):
                    proxy.forward_later(self.command, self.path, headers, body, delay)
                if kind in ("504_then_apply", "504", "504_then_apply_before_next"):
                    return self.reply(504, b'{"error":{"message":"gateway timeout","type":"GatewayTimeout","code":504}}')
                if kind in ("drop_then_apply", "drop"):
                    return self.drop()
                if kind == "hang":
                    # Hold the connection until the client gives up.
                    while True:
                        time.sleep(0.2)
                        try:
                            if self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                                return self.drop()
                        except BlockingIOError:
                            continue
                        except OSError:
                            return self.drop()
                try:
                    status, reason, resp_headers, data = proxy.forward(self.command, self.path, headers, body)
                except OSError as e:
                    return self.reply(502, f'{{"error":{{"message":"{e}","type":"BadGateway","code":502}}}}'.encode())
                if kind == "slow":
                    time.sleep(delay)
                self.send_response(status, reason)
                for k, v in resp_headers:
                    if k.lower() not in ("content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    self.close_connection = True

            def reply(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_POST = do_HEAD = do_DELETE = route

        return Handler
