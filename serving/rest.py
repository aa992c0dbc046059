"""TF Serving's REST API over HTTP/1.1, served by aiohttp on an asyncio event loop of its own:

  GET  /                                                          the story playground (playground.html)
  GET  /v1/models/{name}[/versions/{v}|/labels/{l}]             model status
  GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata    signature_def metadata
  POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict     row or columnar JSON
  POST ...:stream      generate's inputs for one prompt; the story as server-sent events
  POST ...:classify, ...:regress                                 501, as over gRPC
  GET  /monitoring/prometheus/metrics                           request and batching counters

Errors are {"error": "<one sentence>"} with the HTTP status of their gRPC code.

`:stream` (storygen's own, beside TF Serving's API) answers `text/event-stream`: one event per
piece of the story as it is written, `data: {"text": ..., "num_tokens": ..., "log_prob": ...,
"model_version": ..., "done": ...}` (the texts put together are the story that :predict on
`generate` writes for the same inputs; the last piece has "done": true), or, for a failure
after the stream began, `event: error` with {"error": ...}. Its body is :predict's columnar
form, {"inputs": {"prompt": "...", "max_new_tokens": 200, "temperature": 0.8, ...}}.

Connections cost no thread: idle and slow clients wait on the event loop (aiohttp parses HTTP/1.1
strictly, with chunked bodies and keep-alive, and refuses a request with both Content-Length and
Transfer-Encoding), and only Predict's work runs on `--rest_api_num_threads` threads. A request
has `--rest_api_timeout_in_ms` from its first byte of body to its answer: a body that has not
arrived by then is 408, an answer that has not is 504, and the model call is cancelled.
"""

import asyncio
import functools
import html
import importlib.resources
import json
import logging as std_logging
import re
import threading
import time
from concurrent import futures

import grpc
from absl import logging
from aiohttp import web
from google.protobuf import json_format

from serving import streaming, tensor_codec
from serving.errors import ServingError, invalid_argument, not_found
from serving.grpc_service import model_status_response
from serving.predictor import Predictor
from serving.stats import RequestRecord, Stats

METRICS_PATH = "/monitoring/prometheus/metrics"
PLAYGROUND = "playground.html"
# TF Serving matches the fixed parts of its URLs in any case (/V1/MODELS/...); model names and labels keep theirs.
_MODEL_URL = re.compile(r"(?i:/v1/models/)(?P<name>[^/:]+)(?:(?i:/versions/)(?P<version>\d+)|(?i:/labels/)(?P<label>[^/:]+))?"
                        r"(?P<action>(?i:/metadata|:predict|:stream|:classify|:regress))?")
_MODELS_URL = re.compile(r"(?i:/v1/models)/?")
# (HTTP method, URL action) -> the API method, named as over gRPC for the logs and counters.
_ROUTES = {("GET", None): "GetModelStatus", ("GET", "/metadata"): "GetModelMetadata",
           ("POST", ":predict"): "Predict", ("POST", ":stream"): "StreamStory", ("POST", ":classify"): "Classify",
           ("POST", ":regress"): "Regress"}


class _Caller:
    """A REST caller's going, told to the predictor the way gRPC's `context.add_callback` tells it:
    a callback added before the caller leaves runs when it does; adding one after returns False."""

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks = []
        self._gone = False

    def add_callback(self, callback) -> bool:
        with self._lock:
            if not self._gone:
                self._callbacks.append(callback)
            return not self._gone

    def leave(self) -> None:
        with self._lock:
            self._gone = True
        for callback in self._callbacks:
            callback()


class RestServer:
    """The REST API on `host:port`: `start()` serves it from a background thread, `shutdown()`
    stops taking connections (SIGTERM), `close()` ends it once requests have drained."""

    def __init__(self, host: str, port: int, predictor: Predictor, stats: Stats, *, max_request_bytes: int,
                 timeout_s: float, num_threads: int, playground: bool = True, backlog: int = 1024,
                 keepalive_timeout_s: float = 30):
        self.predictor = predictor
        self.playground = importlib.resources.files("serving").joinpath(PLAYGROUND).read_text() if playground else None
        self.stats = stats
        self.max_request_bytes = max_request_bytes
        self.timeout_s = timeout_s
        self.draining = False
        self._executor = futures.ThreadPoolExecutor(num_threads, thread_name_prefix="rest")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rest-loop", daemon=True)
        # Bound here, before the loop runs, so that a port in use fails at once; connections wait in the backlog.
        self._runner, self._site = self._loop.run_until_complete(self._bind(host, port, backlog, keepalive_timeout_s))

    async def _bind(self, host, port, backlog, keepalive_timeout_s):
        # No access log: Stats logs one line per request. Requests are drained before cleanup, so it need not wait.
        # handler_cancellation: a client that disconnects cancels its handler, and so its model call.
        server = web.Server(self._answer, handler_cancellation=True, keepalive_timeout=keepalive_timeout_s,
                            access_log=None, logger=_ProtocolErrorLog(std_logging.getLogger("aiohttp.server")))
        runner = web.ServerRunner(server, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        return runner, site

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stops accepting connections; requests being handled finish, and a request that
        arrives later on a kept-alive connection is answered 503 with `Connection: close`."""
        self.draining = True
        asyncio.run_coroutine_threadsafe(self._site.stop(), self._loop).result()

    def close(self) -> None:
        """Closes every connection and stops the loop and the threads."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._executor.shutdown()

    # ---- requests (on the event loop)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == METRICS_PATH and request.method == "GET":
            return _response(200, self.stats.prometheus_text())
        if request.path == "/" and request.method == "GET" and self.playground:
            models = html.escape(json.dumps(self._control_tags()))
            return web.Response(text=self.playground.replace("__MODELS__", models), content_type="text/html")
        if self.draining:  # a request on a connection kept alive across SIGTERM: refused, and the connection closed
            response = _response(503, {"error": "The server is shutting down; send the request to another replica."})
            response.force_close()
            return response
        # The response is sent inside the request's accounting, so a draining server waits for it.
        with self.stats.request("rest") as record:
            try:
                status, body = await self._route(request, record)
                if isinstance(body, web.StreamResponse):  # a stream, already sent
                    return body
                response = _response(status, body)
                unread_body = status in (408, 413)
                if unread_body:
                    response.force_close()
                await response.prepare(request)
                await response.write_eof()
            except (asyncio.CancelledError, ConnectionError):
                record.code = grpc.StatusCode.CANCELLED  # the client went away before its answer
                raise
            if unread_body:  # close now rather than read and discard the rest of a body we refused
                request.protocol.force_close()
            return response

    async def _route(self, request: web.BaseRequest, record: RequestRecord) -> tuple[int, object]:
        """(HTTP status, JSON-able body) for one API request; fills in `record` for the stats."""
        method, path = request.method, request.path
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
            version = int(match["version"]) if match["version"] else None
            name, label = match["name"], match["label"]
            if record.method == "GetModelStatus":
                return 200, self._status(name, version, label)
            if record.method == "GetModelMetadata":
                return 200, self._metadata(name, version, label)
            deadline = time.monotonic() + self.timeout_s
            body = await self._read_body(request, deadline)
            if record.method == "StreamStory":
                return 200, await self._stream(request, record, body, name, version, label, deadline)
            return 200, await self._run(functools.partial(self._predict, body, name, version, label), deadline)
        except ServingError as e:
            record.code = e.code
            return e.http_status, {"error": e.message}
        except Exception as e:  # a server bug: answer 500 (and log it) rather than drop the connection
            logging.exception("REST %s %s failed", method, path)
            record.code = grpc.StatusCode.INTERNAL
            return 500, {"error": f"Internal error: {e}"}

    async def _read_body(self, request: web.BaseRequest, deadline: float) -> bytes:
        """The whole body (chunked or not) within --max_request_bytes, by the deadline."""
        if (request.content_length or 0) > self.max_request_bytes:
            raise _body_too_large(request.content_length, self.max_request_bytes)

        async def read():
            body = bytearray()
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > self.max_request_bytes:
                    raise _body_too_large(f"over {len(body)}", self.max_request_bytes)
            return bytes(body)

        try:
            return await asyncio.wait_for(read(), deadline - time.monotonic())
        except TimeoutError:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, f"The request body did not arrive within "
                               f"{self.timeout_s:g} s (--rest_api_timeout_in_ms).", http_status=408) from None

    async def _run(self, predict, deadline: float):
        """`predict(deadline, on_caller_gone)` on a REST thread, answered DEADLINE_EXCEEDED (504) at
        the deadline; if the client goes first, its model call is cancelled."""
        caller = _Caller()
        try:
            return await asyncio.wait_for(self._loop.run_in_executor(self._executor, predict, deadline,
                                                                     caller.add_callback),
                                          deadline - time.monotonic())
        except TimeoutError:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, f"The deadline passed: no answer within "
                               f"{self.timeout_s:g} s (--rest_api_timeout_in_ms).") from None
        except asyncio.CancelledError:
            caller.leave()
            raise

    async def _stream(self, request, record: RequestRecord, body: bytes, name, version, label,
                      deadline: float) -> web.StreamResponse:
        """Sends the story's pieces as server-sent events while a REST thread writes them. A
        request the model cannot run raises before the response starts, as for :predict."""
        servable, signature = streaming.find(self.predictor, name, version, label)
        record.target = f"{servable.name}/{servable.version}/{streaming.STREAM_SIGNATURE}"
        inputs, _ = tensor_codec.decode_json_request(_json_object(body), signature)
        caller = _Caller()
        pieces = streaming.stream(self.predictor, servable, inputs, deadline, on_caller_gone=caller.add_callback)
        queue = asyncio.Queue()

        def write():  # on a REST thread
            try:
                for piece in pieces:
                    self._loop.call_soon_threadsafe(queue.put_nowait, piece)
            except Exception as e:
                self._loop.call_soon_threadsafe(queue.put_nowait, e)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        self._loop.run_in_executor(self._executor, write)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), deadline - time.monotonic())
                except TimeoutError:
                    caller.leave()
                    item = ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, f"The deadline passed: the story was not "
                                        f"written within {self.timeout_s:g} s (--rest_api_timeout_in_ms).")
                if isinstance(item, streaming.Piece):
                    await response.write(_event({"text": item.text, "num_tokens": item.num_tokens,
                                                 "log_prob": item.log_prob, "model_version": servable.version,
                                                 "done": item.done}))
                    if item.done:
                        break
                    continue
                if not isinstance(item, ServingError):  # a server bug
                    logging.error("REST StreamStory failed", exc_info=item)
                    item = ServingError(grpc.StatusCode.INTERNAL, f"Internal error: {item}")
                record.code = item.code
                await response.write(_event({"error": item.message}, "error"))
                break
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            caller.leave()  # the client went: the model call in progress is cancelled, and no more are made
            raise
        return response

    def _control_tags(self) -> dict:
        """{model name: the control tags of the version it answers with} (no version loaded: none)."""
        tags = {}
        for name in self.predictor.models.names():
            try:
                tags[name] = self.predictor.models.resolve(name).control_tags
            except ServingError:
                tags[name] = []
        return tags

    def _status(self, name, version, label):
        response = model_status_response(self.predictor.models.statuses(name, version, label))
        return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, name, version, label):
        servable = self.predictor.models.resolve(name, version, label)
        return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                # Every field, defaults too, as TF Serving writes it (a scalar's shape is {"dim": [], "unknown_rank": false}).
                "metadata": {"signature_def": json_format.MessageToDict(servable.signature_def_map,
                                                                        preserving_proto_field_name=True,
                                                                        always_print_fields_with_no_presence=True)}}

    def _predict(self, body: bytes, name, version, label, deadline: float, on_caller_gone) -> dict:
        payload = _json_object(body)
        signature_name = payload.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument('"signature_name" must be a string.')
        servable, signature = self.predictor.find(name, version, label, signature_name)
        inputs, row_format = tensor_codec.decode_json_request(payload, signature)
        outputs = self.predictor.predict(servable, signature, inputs, deadline=deadline, on_caller_gone=on_caller_gone)
        return tensor_codec.encode_json_response(outputs, row_format)


class _ProtocolErrorLog(std_logging.LoggerAdapter):
    """aiohttp's log of requests it refused before the handler saw them (malformed HTTP): one
    warning line each, without the parser's traceback, as they are the client's mistakes."""

    def log(self, level, msg, *args, exc_info=None, **kwargs):
        if isinstance(exc_info, BaseException):
            msg, args = msg + ": %s", (*args, " ".join(str(exc_info).split()))
        self.logger.log(min(level, std_logging.WARNING), msg, *args, **kwargs)


def _json_object(body: bytes) -> dict:
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise invalid_argument(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(payload, dict):
        raise invalid_argument("The request body must be a JSON object.")
    return payload


def _event(data: dict, kind: str | None = None) -> bytes:
    """One server-sent event."""
    head = f"event: {kind}\n" if kind else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


def _body_too_large(length, limit: int) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"The request body is {length} bytes, over this "
                                                            f"server's limit of {limit}.", http_status=413)


def _response(status: int, body) -> web.Response:
    """A JSON response (or text, for the metrics)."""
    if isinstance(body, str):
        return web.Response(status=status, body=body.encode("utf-8"),
                            headers={"Content-Type": "text/plain; version=0.0.4"})
    return web.Response(status=status, body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                        content_type="application/json")
