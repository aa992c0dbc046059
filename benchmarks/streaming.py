"""Streaming a story against writing it in one call, at batch 1.

Section `streaming` of `python -m benchmarks.run`. A worker process starts `python -m
serving.server` on a storygen export (`--serving_model_base_path`, or else the default
configuration's model shape and vocabulary size with random weights, as speed does not
depend on the weights; --quick: a small shape) and, for each of a few prompts, asks for the
same story two ways in turns: streamed over gRPC (`storygen.StoryService/StreamStory`),
noting when the first text and the last piece arrive, and in one gRPC Predict on `generate`.
Sampling is seeded, so both write the same story (the worker checks it). The rows: the time to
the first streamed text against the whole story in one call (goal: under 0.5 s), and the whole
streamed story against the one call (goal: at most 1.3x as long, so the ratio's target is 0.77).
"""

import atexit
import os
import time

from benchmarks.harness import alternate
from benchmarks.serving import MODEL_NAME, Server

PROMPTS = ("从前有座山，", "Once upon a time", "一只狐狸", "The old fisherman said")
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 7}
MAX_NEW_TOKENS = 384  # the default model's window
STREAM_TARGET = 0.77  # 1 / 1.3: the streamed story takes at most 1.3x the one call


def save_default_shaped_export(base_path: str, quick: bool) -> None:
    """Version 1: the default configuration's model (--quick: a small one), random weights."""
    import keras

    from benchmarks.decoding import make_tokenizer_proto
    from components import exporter
    from components.config import ExportConfig, ModelConfig
    from components.model import build_model
    from components.tokenizer import make_tokenizer

    config = ModelConfig(vocab_size=500, d_model=32, num_layers=1, ff_dim=64, max_story_tokens=96) if quick \
        else ModelConfig()
    keras.utils.set_random_seed(0)
    tokenizer = make_tokenizer(make_tokenizer_proto(config.vocab_size, num_sentences=2000 if quick else 30000))
    path = exporter.export(build_model(config), tokenizer, os.path.join(base_path, ".tmp-1"), ExportConfig())
    os.rename(path, os.path.join(base_path, "1"))


def streaming_worker(work_dir: str, model_base_path: str | None, max_new_tokens: int, quick: bool):
    """Worker: one server on the model; `stream(prompt)` and `whole(prompt)` time one story."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from serving.grpc_service import STREAM_STORY

    if model_base_path is None:
        model_base_path = os.path.join(work_dir, "streaming-default-shape")
        os.makedirs(model_base_path)
        save_default_shaped_export(model_base_path, quick)
    server = Server(model_base_path)
    atexit.register(server.stop)
    stream_story = server.channel.unary_stream(STREAM_STORY,
                                               request_serializer=predict_pb2.PredictRequest.SerializeToString,
                                               response_deserializer=predict_pb2.PredictResponse.FromString)

    def request(prompt: str, signature: str):
        message = predict_pb2.PredictRequest()
        message.model_spec.name = MODEL_NAME
        message.model_spec.signature_name = signature
        message.inputs["prompt"].CopyFrom(tf.make_tensor_proto([prompt.encode("utf-8")], dtype=tf.string, shape=[1]))
        for name, value, dtype in (("max_new_tokens", max_new_tokens, tf.int32), ("temperature", SAMPLING["temperature"],
                                   tf.float32), ("top_k", SAMPLING["top_k"], tf.int32),
                                   ("top_p", SAMPLING["top_p"], tf.float32), ("seed", SAMPLING["seed"], tf.int64)):
            message.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        return message

    def whole(prompt: str) -> dict:
        start = time.perf_counter()
        response = server.stub.Predict(request(prompt, "generate"), timeout=120)
        return {"seconds": time.perf_counter() - start,
                "story": tf.make_ndarray(response.outputs["story"])[0].decode("utf-8"),
                "tokens": int(tf.make_ndarray(response.outputs["num_tokens"])[0])}

    def stream(prompt: str) -> dict:
        start = time.perf_counter()
        first, texts = None, []
        for piece in stream_story(request(prompt, "generate"), timeout=120):
            texts.append(tf.make_ndarray(piece.outputs["text"])[0].decode("utf-8"))
            if first is None and texts[-1]:
                first = time.perf_counter() - start
        return {"seconds": time.perf_counter() - start, "first": first, "story": "".join(texts),
                "pieces": len(texts)}

    deadline = time.monotonic() + 120
    while True:  # ready once a story comes back
        try:
            whole(PROMPTS[0])
            stream(PROMPTS[0])
            break
        except grpc.RpcError:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not answer within 120 s; run `python -m serving.server` by hand "
                                   "to see why.") from None
            time.sleep(0.5)
    return {"stream": stream, "whole": whole}


def run_section(h, model_base_path: str | None = None):
    max_new_tokens = 64 if h.quick else MAX_NEW_TOKENS
    w = h.worker("streaming", "benchmarks.streaming:streaming_worker", work_dir=h.work_dir,
                 model_base_path=model_base_path, max_new_tokens=max_new_tokens, quick=h.quick)
    default = "a small one (--quick)" if h.quick else "of the default configuration"
    h.note(f"streaming: model {model_base_path or default + ', random weights'}; batch 1, "
           f"at most {max_new_tokens} new tokens, sampling {SAMPLING}; server with default flags")
    firsts, streamed, wholes, mismatched = [], [], [], []
    for prompt in PROMPTS[:2] if h.quick else PROMPTS:
        stats = alternate({"stream": lambda: w.call("stream", prompt=prompt),
                           "whole": lambda: w.call("whole", prompt=prompt)}, h.repeats)
        stream, whole = stats["stream"], stats["whole"]
        if any(s["story"] != whole.values[0]["story"] for s in stream.values + whole.values):
            mismatched.append(prompt)
        firsts.append(stream.map(lambda r: r["first"] * 1000))
        streamed.append(stream.map(lambda r: r["seconds"] * 1000))
        wholes.append(whole.map(lambda r: r["seconds"] * 1000))
        h.note(f"streaming {prompt!r}: {whole.values[0]['tokens']} tokens in {stream.values[0]['pieces']} pieces")
    w.close()
    for i, prompt in enumerate(PROMPTS[:len(firsts)]):
        h.row(f"stream {prompt!r}: first text", "ms", firsts[i], "whole story, one call", wholes[i],
              higher_is_better=False)
        h.row(f"stream {prompt!r}: whole story", "ms", streamed[i], "whole story, one call", wholes[i],
              higher_is_better=False, target=STREAM_TARGET)
    if mismatched:
        h.note(f"streaming: the streamed story differed from the one call's for {mismatched}")
