#!/usr/bin/env python3
"""A small ClickHouse-HTTP-compatible gateway over chdb (ClickHouse 26.x in-process).

Debian ships only ClickHouse 18.16, which has no ArrowStream and no DateTime64, so the
test suite and the demo talk to this gateway instead. It speaks the subset of the
ClickHouse HTTP interface the service uses, with the same behaviour a real server has:

* query from the `query` URL parameter and/or the POST body (joined as ClickHouse does);
* `FORMAT X` in the query, else `default_format`, else TabSeparated;
* `database` parameter, `param_<name>` query parameters bound as `{name:Type}`;
* any other URL parameter is a setting, applied as a trailing SETTINGS clause to SELECTs;
* user/password from `user`/`password` parameters, `X-ClickHouse-User`/`X-ClickHouse-Key`
  headers or HTTP basic auth; wrong credentials give 516 AUTHENTICATION_FAILED (HTTP 403);
* responses are streamed (chunked); an error before any output is an HTTP error with
  `X-ClickHouse-Exception-Code`; an error after output started cuts the response
  without the terminating chunk, so a client can never mistake it for a complete result;
* chdb's streamed ArrowStream is one IPC stream per chunk: it is re-framed into one stream.

chdb runs one engine per process and a streaming query is cancelled by any other
query on the same engine, so requests are serialised by one lock: safe, not parallel.
"""
import argparse
import base64
import os
import re
import signal
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
from chdb import session as chdb_session

FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
CODE_RE = re.compile(r"Code:\s*(\d+)")
NAME_RE = re.compile(r"\(([A-Z_]+)\)\s*$")
STREAMABLE_RE = re.compile(r"^\s*(\(|SELECT\b|WITH\b)", re.IGNORECASE)
SETTING_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# Parameters of the HTTP interface that are not settings.
RESERVED = {"query", "database", "default_format", "user", "password", "query_id",
            "session_id", "session_timeout", "compress", "decompress",
            "wait_end_of_query", "buffer_size", "quota_key", "enable_http_compression"}
HTTP_STATUS = {60: 404, 81: 404, 62: 400, 47: 400, 36: 400, 516: 403, 497: 403, 159: 504}


class Engine:
    def __init__(self, path):
        self.session = chdb_session.Session(path)
        self.lock = threading.Lock()
        self.version = self.session.query("SELECT version()", "TabSeparated").bytes().decode().strip()


def drain_failed_stream(sess):
    """After a streamed query fails, chdb keeps the output it had produced (the Arrow schema at
    least) and prefixes it to the next query's result; one throwaway query takes it."""
    try:
        sess.query("SELECT 1", "Null")
    except Exception:  # noqa: BLE001
        pass


class ClickHouseError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def error_from(exc):
    text = str(exc)
    text = text.removeprefix("Streaming query failed: ")
    m = CODE_RE.search(text)
    return ClickHouseError(int(m.group(1)) if m else 1002, text.strip())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb-gateway"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
    # the client's delayed ACK add 40 ms to every small response (a real server sets it too).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("gateway: " + (fmt % args) + "\n")

    # -- request parsing -------------------------------------------------
    def _params(self):
        parsed = urllib.parse.urlsplit(self.path)
        return parsed.path, dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))

    def _credentials(self, params):
        user = self.headers.get("X-ClickHouse-User") or params.get("user")
        password = self.headers.get("X-ClickHouse-Key") or params.get("password")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                user, password = user or u, password if password is not None else p
            except ValueError:
                pass
        return user or "default", password or ""

    def do_GET(self):
        path, params = self._params()
        if path in ("/ping", "/") and "query" not in params:
            return self._plain(200, b"Ok.\n")
        self._handle(path, params, b"")

    def do_POST(self):
        path, params = self._params()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self._handle(path, params, body)

    # -- responses -------------------------------------------------------
    def _plain(self, status, data, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err):
        status = HTTP_STATUS.get(err.code, 500)
        m = NAME_RE.search(str(err))
        name = m.group(1) if m else "UNKNOWN"
        text = str(err)
        if not text.startswith("Code:"):
            text = f"Code: {err.code}. DB::Exception: {text}"
        self._plain(status, (text + f" (version {self.server.engine.version})\n").encode(),
                    [("X-ClickHouse-Exception-Code", str(err.code)),
                     ("X-ClickHouse-Exception-Name", name)])

    def _chunk(self, data):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _handle(self, path, params, body):
        if path not in ("/", "/query"):
            return self._plain(404, b"Not found\n")
        user, password = self._credentials(params)
        if user != self.server.user or password != self.server.password:
            return self._error(ClickHouseError(
                516, f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
                     f"or there is no user with such name. (AUTHENTICATION_FAILED)"))
        query = " ".join(x for x in (params.get("query", ""), body.decode("utf-8", "replace")) if x.strip())
        if not query.strip():
            return self._error(ClickHouseError(62, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)"))
        fmt = params.get("default_format") or "TabSeparated"
        m = FORMAT_RE.search(query)
        if m:
            fmt, query = m.group(1), query[: m.start()]
        query = query.strip().rstrip(";")
        qparams = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items() if k not in RESERVED and not k.startswith("param_")}
        for name in settings:
            if not SETTING_NAME_RE.match(name):
                return self._error(ClickHouseError(115, f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING)"))
        if settings and re.match(r"^\s*(SELECT|WITH)\b", query, re.IGNORECASE) and not re.search(r"\bSETTINGS\b", query, re.IGNORECASE):
            query += " SETTINGS " + ", ".join(f"{k}={quote_setting(v)}" for k, v in settings.items())
        database = params.get("database")
        # chdb compresses its own ArrowStream chunks, but they are re-encoded below into one
        # stream: apply the setting there, with ClickHouse's default (lz4_frame).
        compression = {"lz4_frame": "lz4", "zstd": "zstd", "none": None}.get(
            settings.get("output_format_arrow_compression_method", "lz4_frame"), "lz4")
        with self.server.engine.lock:
            self._run(query, fmt, qparams, database, compression)

    def _run(self, query, fmt, qparams, database, compression="lz4"):
        sess = self.server.engine.session
        try:
            if database:
                sess.query(f"USE {quote_ident(database)}", "TabSeparated")
            try:
                self._stream(sess, query, fmt, qparams, compression)
            finally:
                if database:
                    sess.query("USE default", "TabSeparated")
        except ClickHouseError as err:
            self._error(err)

    def _stream(self, sess, query, fmt, qparams, compression):
        arrow_stream = fmt.lower() == "arrowstream"
        if not STREAMABLE_RE.match(query):
            # DDL and INSERT cannot be streamed by chdb; they return little or nothing.
            try:
                data = sess.query(query, fmt, params=qparams).bytes()
            except Exception as exc:  # noqa: BLE001
                raise error_from(exc)
            return self._plain(200, data)
        try:
            stream = sess.send_query(query, fmt, params=qparams)
            first = stream.fetch()  # chdb raises only when the first chunk is fetched
        except Exception as exc:  # noqa: BLE001 - every engine error becomes a ClickHouse error
            drain_failed_stream(sess)
            raise error_from(exc)
        if first is None:
            # No rows. A real server still sends the ArrowStream schema (chdb's streaming does not).
            try:
                data = sess.query(query, fmt, params=qparams).bytes()
            except Exception as exc:  # noqa: BLE001
                raise error_from(exc)
            return self._plain(200, data, [("X-ClickHouse-Format", fmt)])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-ClickHouse-Format", fmt)
        self.end_headers()
        writer = None
        sink = ChunkSink(self)
        chunk = first
        try:
            while chunk is not None:
                data = chunk.bytes()
                if arrow_stream:
                    reader = pa.ipc.open_stream(data)
                    if writer is None:
                        options = pa.ipc.IpcWriteOptions(compression=compression)
                        writer = pa.ipc.new_stream(sink, reader.schema, options=options)
                    for batch in reader:
                        writer.write_batch(batch)
                else:
                    self._chunk(data)
                chunk = stream.fetch()
            if writer is not None:
                writer.close()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            stream.close()
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - error after output started: cut the response
            err = error_from(exc)
            drain_failed_stream(sess)
            try:
                self._chunk(f"\nCode: {err.code}. DB::Exception: {err}\n".encode())
                self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass


class ChunkSink:
    """A file-like object for pyarrow that writes HTTP chunks."""

    def __init__(self, handler):
        self.handler = handler
        self.closed = False

    def write(self, data):
        self.handler._chunk(bytes(data))
        return len(data)

    def flush(self):
        self.handler.wfile.flush()

    def close(self):
        self.closed = True


def quote_setting(value):
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name):
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="chdb data directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--user", default="default")
    ap.add_argument("--password-file", help="file holding the password (default: empty password)")
    ap.add_argument("--ready-file", help="write the bound port here once listening")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.engine = Engine(args.data)
    server.user = args.user
    server.password = open(args.password_file).read().strip() if args.password_file else ""
    server.verbose = args.verbose
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(tmp, args.ready_file)
    print(f"chdb gateway: ClickHouse {server.engine.version} on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.engine.session.close()


if __name__ == "__main__":
    main()
