#!/usr/bin/env python3
"""A small Iceberg REST catalog server for the tests: the REST protocol in front of
pyiceberg's SQL catalog (SQLite), so commits are validated by pyiceberg's own requirement
checks and compare-and-swap, not by code of this project. No production REST catalog
(Lakekeeper, Polaris, Nessie) can be installed here; this speaks the same spec.

Routes: GET /v1/config; namespaces (list, create, load, exists); tables (list, create, load,
exists, commit, drop). Errors are REST `ErrorModel`s (404 NoSuch*, 409 CommitFailed/AlreadyExists).

Usage: rest_catalog.py --port P --catalog-uri sqlite:////abs/rest.db --warehouse file:///abs/wh
       [--token T]   (then every request must carry `Authorization: Bearer T`)
"""
import argparse
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (CommitFailedException, NamespaceAlreadyExistsError, NoSuchNamespaceError,
                                  NoSuchTableError, TableAlreadyExistsError)
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import CommitTableRequest
from pyiceberg.transforms import parse_transform

ERRORS = {
    NoSuchTableError: (404, "NoSuchTableException"),
    NoSuchNamespaceError: (404, "NoSuchNamespaceException"),
    CommitFailedException: (409, "CommitFailedException"),
    TableAlreadyExistsError: (409, "AlreadyExistsException"),
    NamespaceAlreadyExistsError: (409, "AlreadyExistsException"),
}


def make_handler(catalog, token, lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body=None):
            data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def body(self):
            return self._body or b"{}"

        def route(self):
            # The body is read before any answer: one left unread on a kept-alive connection
            # would be parsed as the next request (Iceberg Java's client reuses connections).
            n = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(n) if n else b""
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                return self.reply(401, {"error": {"message": "not authorized", "type": "NotAuthorizedException", "code": 401}})
            path = urllib.parse.urlparse(self.path).path
            parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
            if parts[:1] != ["v1"]:
                return self.reply(404, {"error": {"message": f"no route {path}", "type": "NotFound", "code": 404}})
            parts = parts[1:]
            try:
                with lock:  # one request at a time: SQLite, and simple reasoning about CAS
                    return self.dispatch(parts)
            except tuple(ERRORS) as e:
                code, kind = ERRORS[type(e)]
                return self.reply(code, {"error": {"message": str(e), "type": kind, "code": code}})
            except Exception as e:  # noqa: BLE001 - surface anything else as a server error
                return self.reply(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "ServerError", "code": 500}})

        def dispatch(self, parts):
            m = self.command
            if parts == ["config"] and m == "GET":
                return self.reply(200, {"defaults": {}, "overrides": {}})
            if parts == ["namespaces"]:
                if m == "GET":
                    return self.reply(200, {"namespaces": [list(n) for n in catalog.list_namespaces()]})
                if m == "POST":
                    req = json.loads(self.body())
                    catalog.create_namespace(tuple(req["namespace"]), req.get("properties") or {})
                    return self.reply(200, {"namespace": req["namespace"], "properties": req.get("properties") or {}})
            if len(parts) == 2 and parts[0] == "namespaces":
                ns = tuple(parts[1].split("\x1f"))
                if m in ("GET", "HEAD"):
                    props = catalog.load_namespace_properties(ns)
                    return self.reply(200, {"namespace": list(ns), "properties": props}) if m == "GET" else self.reply(204)
                if m == "DELETE":
                    catalog.drop_namespace(ns)
                    return self.reply(204)
            if len(parts) == 3 and parts[0] == "namespaces" and parts[2] == "tables":
                ns = tuple(parts[1].split("\x1f"))
                if m == "GET":
                    ids = [{"namespace": list(i[:-1]), "name": i[-1]} for i in catalog.list_tables(ns)]
                    return self.reply(200, {"identifiers": ids})
                if m == "POST":
                    req = json.loads(self.body())
                    # The spec's request carries an unbound partition spec (no field ids).
                    fields = [PartitionField(source_id=f["source-id"], field_id=f.get("field-id", 1000 + i),
                                             transform=parse_transform(f["transform"]), name=f["name"])
                              for i, f in enumerate((req.get("partition-spec") or {}).get("fields", []))]
                    table = catalog.create_table(ns + (req["name"],), Schema.model_validate(req["schema"]),
                                                 location=req.get("location"), partition_spec=PartitionSpec(*fields),
                                                 properties=req.get("properties") or {})
                    return self.reply(200, load_result(table))
            if len(parts) == 3 and parts[0] == "namespaces" and parts[2] == "register" and m == "POST":
                # The spec's RegisterTableRequest: {"name", "metadata-location"}.
                req = json.loads(self.body())
                ns = tuple(parts[1].split("\x1f"))
                table = catalog.register_table(ns + (req["name"],), req["metadata-location"])
                return self.reply(200, load_result(table))
            if len(parts) == 5 and parts[0] == "namespaces" and parts[2] == "tables" and parts[4] == "metrics" and m == "POST":
                return self.reply(204)  # scan and commit reports (Iceberg Java sends them): accepted, not kept
            if len(parts) == 4 and parts[0] == "namespaces" and parts[2] == "tables":
                ident = tuple(parts[1].split("\x1f")) + (parts[3],)
                if m in ("GET", "HEAD"):
                    table = catalog.load_table(ident)
                    return self.reply(200, load_result(table)) if m == "GET" else self.reply(204)
                if m == "POST":
                    req = CommitTableRequest.model_validate_json(self.body())
                    table = catalog.load_table(ident)
                    resp = catalog.commit_table(table, tuple(req.requirements), tuple(req.updates))
                    return self.reply(200, json.loads(resp.model_dump_json(by_alias=True, exclude_none=True)))
                if m == "DELETE":
                    catalog.drop_table(ident)
                    return self.reply(204)
            return self.reply(404, {"error": {"message": f"no route {m} /v1/{'/'.join(parts)}", "type": "NotFound", "code": 404}})

        do_GET = do_POST = do_HEAD = do_DELETE = route

    return Handler


def load_result(table):
    return {"metadata-location": table.metadata_location,
            "metadata": json.loads(table.metadata.model_dump_json(by_alias=True, exclude_none=True)),
            "config": {}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--catalog-uri", required=True)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--name", default="offload", help="catalog name in the SQL store")
    a = ap.parse_args(argv)
    catalog = SqlCatalog(a.name, uri=a.catalog_uri, warehouse=a.warehouse)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), make_handler(catalog, a.token, threading.Lock()))
    print(f"REST catalog on http://127.0.0.1:{a.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
