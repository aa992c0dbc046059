"""storygen's model server: speaks TensorFlow Serving's gRPC and REST APIs, so any TF Serving
client works against it unchanged (and the storygen client works against a real TF Serving).

Modules, one concern each:
  server.py         flags and `main()`: wires everything together, drains on SIGTERM
  models.py         the models served: from the flags or a ModelServerConfig file, re-read as it changes
  model_manager.py  finds, loads and retires the versions of one model under its base path
  predictor.py      the request path shared by both APIs: resolve, check, run (batched or not)
  batching.py       dynamic batching of concurrent requests into one model call
  grpc_service.py   tensorflow.serving.PredictionService and ModelService
  rest.py           /v1/models/... over HTTP with TF Serving's JSON
  tensor_codec.py   TensorProto and JSON <-> numpy
  stats.py          request counters, per-minute summary, Prometheus text
  errors.py         ServingError: one status code and one sentence per bad request
  client.py         `storygen-client`: prompt in, story out, over gRPC or REST
"""
