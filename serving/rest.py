"""TF Serving's REST API over HTTP/1.1 (stdlib http.server, a thread per connection):

  GET  /v1/models/{name}[/versions/{v}|/labels/{l}]             model status
  GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata    signature_def metadata
  POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict     row or columnar JSON
  POST ...:classify, ...:regress                                 501, as over gRPC
  GET  /monitoring/prometheus/metrics                           request and batching counters

Errors are {"error": "<one sentence>"} with the HTTP status of their gRPC code.
"""

import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from absl import logging
from google.protobuf import json_format

from serving import tensor_codec
from serving.errors import ServingError, invalid_argument, not_found
from serving.grpc_service import model_status_response
from serving.predictor import Predictor
from serving.stats import RequestRecord, Stats

METRICS_PATH = "/monitoring/prometheus/metrics"
# TF Serving matches the fixed parts of its URLs in any case (/V1/MODELS/...); model names and labels keep theirs.
_MODEL_URL = re.compile(r"(?i:/v1/models/)(?P<name>[^/:]+)(?:(?i:/versions/)(?P<version>\d+)|(?i:/labels/)(?P<label>[^/:]+))?"
                        r"(?P<action>(?i:/metadata|:predict|:classify|:regress))?")
_MODELS_URL = re.compile(r"(?i:/v1/models)/?")
# (HTTP method, URL action) -> the API method, named as over gRPC for the logs and counters.
_ROUTES = {("GET", None): "GetModelStatus", ("GET", "/metadata"): "GetModelMetadata",
           ("POST", ":predict"): "Predict", ("POST", ":classify"): "Classify", ("POST", ":regress"): "Regress"}


class RestServer:
    """The REST API on `host:port`, served from a background thread until `shutdown()`."""

    def __init__(self, host: str, port: int, predictor: Predictor, stats: Stats, *, max_request_bytes: int,
                 timeout_s: float, max_connections: int):
        self.predictor = predictor
        self.stats = stats
        self.max_request_bytes = max_request_bytes
        self.timeout_s = timeout_s
        self._httpd = _HttpServer((host, port), self, max_connections)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rest", daemon=True)
        self.draining = False

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stops accepting connections; requests already being handled finish on their threads,
        and a request that arrives later on a kept-alive connection is answered 503 with
        `Connection: close`."""
        self.draining = True
        self._httpd.shutdown()
        self._httpd.server_close()

    def handle(self, handler: "_Handler", method: str, path: str, record: RequestRecord) -> tuple[int, object]:
        """(HTTP status, JSON-able body) for one API request; fills in `record` for the stats."""
        record.target = path
        match = _MODEL_URL.fullmatch(path)
        action = match and match["action"] and match["action"].lower()
        record.method = (match and _ROUTES.get((method, action))) or "Unknown"
        try:
            if _MODELS_URL.fullmatch(path):
                raise invalid_argument("Missing model name in request.")
            if match is None:
                raise not_found(f"No such URL: {path}; see /v1/models/<name>[/versions/<v>]...")
            if record.method == "Unknown":
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not allowed on {path}.",
                                   http_status=405)
            if record.method in ("Classify", "Regress"):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   f"{record.method} is not implemented by storygen-serve.")
            answer = {"GetModelStatus": self._status, "GetModelMetadata": self._metadata,
                      "Predict": self._predict}[record.method]
            version = int(match["version"]) if match["version"] else None
            return 200, answer(handler, match["name"], version, match["label"])
        except ServingError as e:
            record.code = e.code
            return e.http_status, {"error": e.message}
        except Exception as e:  # a server bug: answer 500 (and log it) rather than drop the connection
            logging.exception("REST %s %s failed", method, path)
            record.code = grpc.StatusCode.INTERNAL
            return 500, {"error": f"Internal error: {e}"}

    def _status(self, handler, name, version, label):
        response = model_status_response(self.predictor.manager.statuses(name, version, label))
        return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, handler, name, version, label):
        servable = self.predictor.manager.resolve(name, version, label)
        return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                # Every field, defaults too, as TF Serving writes it (a scalar's shape is {"dim": [], "unknown_rank": false}).
                "metadata": {"signature_def": json_format.MessageToDict(servable.signature_def_map,
                                                                        preserving_proto_field_name=True,
                                                                        always_print_fields_with_no_presence=True)}}

    def _predict(self, handler, name, version, label):
        payload = handler.read_json(self.max_request_bytes)
        signature_name = payload.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument('"signature_name" must be a string.')
        servable, signature = self.predictor.find(name, version, label, signature_name)
        inputs, row_format = tensor_codec.decode_json_request(payload, signature)
        outputs = self.predictor.predict(servable, signature, inputs, deadline=time.monotonic() + self.timeout_s)
        return tensor_codec.encode_json_response(outputs, row_format)


class _HttpServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that answers 503 at once beyond `max_connections` connections,
    so a flood of clients cannot start unbounded threads."""

    def __init__(self, address, app: RestServer, max_connections: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": "Too many concurrent REST connections; retry later."}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass  # the client is gone already
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so clients reuse connections
    # TCP_NODELAY: the headers and the body go out in two writes, and with Nagle's algorithm the
    # body waited for the client's delayed ACK of the headers, 40 ms on every reused connection.
    disable_nagle_algorithm = True
    server_version = "storygen-serve"
    timeout = 30  # seconds a connection may idle or trickle before it is closed

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_PUT(self):
        self._answer("PUT")

    def do_DELETE(self):
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        self.body_read = False
        app = self.server.app
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path == METRICS_PATH and method == "GET":
            self._send(200, app.stats.prometheus_text())
            return
        if app.draining:  # a request on a connection kept alive across SIGTERM: refused, and the connection closed
            self.close_connection = True
            self._send(503, {"error": "The server is shutting down; send the request to another replica."})
            return
        # The response is sent inside the request's accounting, so a draining server waits for it.
        with app.stats.request("rest") as record:
            status, body = app.handle(self, method, path, record)
            self._send(status, body)

    def _send(self, status: int, body) -> None:
        """Sends a JSON body (or text, for the metrics)."""
        if not self.body_read and self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # the unread body would be taken for the next request
        if isinstance(body, str):
            data, content_type = body.encode("utf-8"), "text/plain; version=0.0.4"
        else:
            data, content_type = json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json"
        try:
            self.send_response(status)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client went away; nothing left to tell it

    def read_json(self, max_bytes: int) -> dict:
        """The request body parsed as a JSON object, within `max_bytes`."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # a chunked body, if any, was not read
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "The request needs a Content-Length header.",
                               http_status=411)
        if int(length) > max_bytes:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"The request body is {length} bytes, over this "
                                                                    f"server's limit of {max_bytes}.", http_status=413)
        body = self.rfile.read(int(length))
        self.body_read = True
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise invalid_argument(f"The request body is not valid JSON: {e}.") from None
        if not isinstance(payload, dict):
            raise invalid_argument("The request body must be a JSON object.")
        return payload

    def log_request(self, code="-", size="-"):
        pass  # Stats.request already logs one line per request

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        logging.debug("REST %s " + format, self.client_address[0], *args)
