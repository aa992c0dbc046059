"""tensorflow.serving.PredictionService and tensorflow.serving.ModelService over gRPC, with the
service classes generated in tensorflow-serving-api, so TF Serving's clients work unchanged.

Predict, GetModelMetadata, GetModelStatus and HandleReloadConfigRequest are served; Classify,
Regress and MultiInference (tf.Example APIs that storygen's text signatures have no use for)
answer UNIMPLEMENTED.

Beside them, storygen.StoryService/StreamStory streams a story as it is written (see
`StoryService`), with TF Serving's messages, so a client needs no stubs of its own.
"""

import time

import grpc
import numpy as np
from absl import logging
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

from serving import streaming, tensor_codec
from serving.errors import ServingError, invalid_argument
from serving.models import specs_from_config
from serving.predictor import Predictor
from serving.stats import Stats


STORY_SERVICE = "storygen.StoryService"
STREAM_STORY = f"/{STORY_SERVICE}/StreamStory"


def add_services(server: grpc.Server, predictor: Predictor, stats: Stats, max_elements: int) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(predictor, stats, max_elements), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(predictor, stats), server)
    story_service = StoryService(predictor, stats, max_elements)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(STORY_SERVICE, {
        "StreamStory": grpc.unary_stream_rpc_method_handler(
            story_service.StreamStory, request_deserializer=predict_pb2.PredictRequest.FromString,
            response_serializer=predict_pb2.PredictResponse.SerializeToString)}),))


def _spec(request) -> tuple[str, int | None, str | None]:
    """(name, version, label) of a request's ModelSpec; version and label are a oneof, both may
    be unset. A request without one is INVALID_ARGUMENT, as in TF Serving."""
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec.")
    model_spec = request.model_spec
    version = model_spec.version.value if model_spec.HasField("version") else None
    return model_spec.name, version, model_spec.version_label or None


def _inputs(request, signature, max_elements: int) -> dict:
    return {key: tensor_codec.proto_to_ndarray(key, proto, signature.input_dtype(key), max_elements)
            for key, proto in request.inputs.items()}


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _predict_response(servable, signature_name: str) -> predict_pb2.PredictResponse:
    """A PredictResponse that names the version and signature that answered."""
    response = predict_pb2.PredictResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature_name
    return response


def _handle(stats: Stats, method: str, context, answer):
    """Runs `answer(record)` for one RPC, turning a ServingError into the RPC's status."""
    try:
        with stats.request("grpc", method) as record:
            return answer(record)
    except ServingError as e:
        context.abort(e.code, e.message)
    except Exception as e:  # a server bug: answer INTERNAL (and log it) rather than a bare traceback
        logging.exception("gRPC %s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {e}")


def _unimplemented(stats: Stats, method: str, context):
    def answer(record):
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by storygen-serve.")

    return _handle(stats, method, context, answer)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):

    def __init__(self, predictor: Predictor, stats: Stats, max_elements: int):
        self._predictor = predictor
        self._stats = stats
        self._max_elements = max_elements

    def Predict(self, request, context):
        def answer(record):
            name, version, label = _spec(request)
            record.target = f"{name}/{version or label or 'latest'}/{request.model_spec.signature_name}"
            servable, signature = self._predictor.find(name, version, label, request.model_spec.signature_name)
            inputs = _inputs(request, signature, self._max_elements)
            outputs = self._predictor.predict(servable, signature, inputs, list(request.output_filter),
                                              _deadline(context), on_caller_gone=context.add_callback)
            record.target = f"{servable.name}/{servable.version}/{signature.name}"
            response = _predict_response(servable, signature.name)
            for key, array in outputs.items():
                response.outputs[key].CopyFrom(tensor_codec.ndarray_to_proto(array))
            return response

        return _handle(self._stats, "Predict", context, answer)

    def GetModelMetadata(self, request, context):
        def answer(record):
            if list(request.metadata_field) != ["signature_def"]:
                raise invalid_argument("metadata_field must be ['signature_def'], the only metadata this server "
                                       f"has; got {list(request.metadata_field)}.")
            servable = self._predictor.models.resolve(*_spec(request))
            record.target = f"{servable.name}/{servable.version}"
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(servable.signature_def_map)
            return response

        return _handle(self._stats, "GetModelMetadata", context, answer)

    def Classify(self, request, context):
        return _unimplemented(self._stats, "Classify", context)

    def Regress(self, request, context):
        return _unimplemented(self._stats, "Regress", context)

    def MultiInference(self, request, context):
        return _unimplemented(self._stats, "MultiInference", context)


class StoryService:
    """storygen.StoryService. StreamStory takes a PredictRequest with `generate`'s inputs for one
    prompt (model_spec's signature_name is not read) and answers a stream of PredictResponses,
    one per piece of the story as it is written: outputs "text" (what the piece adds to the
    story), "num_tokens" and "log_prob" (the story's so far), each of shape [1]. The texts put
    together are the story that Predict on `generate` writes for the same inputs. Call it with
    `channel.unary_stream(STREAM_STORY, PredictRequest.SerializeToString, PredictResponse.FromString)`."""

    def __init__(self, predictor: Predictor, stats: Stats, max_elements: int):
        self._predictor = predictor
        self._stats = stats
        self._max_elements = max_elements

    def StreamStory(self, request, context):
        try:
            with self._stats.request("grpc", "StreamStory") as record:
                servable, signature = streaming.find(self._predictor, *_spec(request))
                record.target = f"{servable.name}/{servable.version}/{streaming.STREAM_SIGNATURE}"
                pieces = streaming.stream(self._predictor, servable, _inputs(request, signature, self._max_elements),
                                          _deadline(context), on_caller_gone=context.add_callback)
                for piece in pieces:
                    response = _predict_response(servable, streaming.STREAM_SIGNATURE)
                    for key, value in (("text", np.array([piece.text.encode("utf-8")], object)),
                                       ("num_tokens", np.array([piece.num_tokens], np.int32)),
                                       ("log_prob", np.array([piece.log_prob], np.float32))):
                        response.outputs[key].CopyFrom(tensor_codec.ndarray_to_proto(value))
                    try:
                        yield response
                    except GeneratorExit:  # the caller went before the story ended
                        record.code = grpc.StatusCode.CANCELLED
                        raise
        except ServingError as e:
            context.abort(e.code, e.message)
        except Exception as e:  # a server bug: answer INTERNAL (and log it) rather than a bare traceback
            logging.exception("gRPC StreamStory failed")
            context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {e}")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):

    def __init__(self, predictor: Predictor, stats: Stats):
        self._models = predictor.models
        self._stats = stats

    def GetModelStatus(self, request, context):
        def answer(record):
            record.target = request.model_spec.name
            return model_status_response(self._models.statuses(*_spec(request)))

        return _handle(self._stats, "GetModelStatus", context, answer)

    def HandleReloadConfigRequest(self, request, context):
        """Serves the request's ModelServerConfig from now on; answers once its models' versions
        are loaded (or have failed to), as TF Serving does."""
        def answer(record):
            try:
                specs = specs_from_config(request.config)
            except ValueError as e:
                raise invalid_argument(f"The config cannot be served: {e}") from None
            record.target = ",".join(spec.name for spec in specs)
            self._models.apply(specs)
            self._models.poll()
            return model_management_pb2.ReloadConfigResponse()

        return _handle(self._stats, "HandleReloadConfigRequest", context, answer)


def model_status_response(statuses) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatusResponse for a list of model_manager.VersionStatus (REST sends it as JSON)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        entry = response.model_version_status.add(version=status.version, state=status.state)
        entry.status.SetInParent()  # TF Serving always sends a status: OK unless the load failed
        if status.error:
            entry.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
            entry.status.error_message = status.error
    return response
