r"""storygen-client: sends prompts to storygen-serve, or to a real TensorFlow Serving, and prints
the stories, one per prompt.

    python -m serving.client --server localhost:8500 --prompt 从前有座山
    python -m serving.client --prompt "Once upon a time" --signature generate \
        --max_new_tokens 64 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 7
    python -m serving.client --rest http://localhost:8501 --prompt 从前有座山 --tag zh --tag fable
    python -m serving.client --stream --prompt 从前有座山 --max_new_tokens 200 --temperature 0.8 \
        --top_k 40 --top_p 0.95 --seed 7

--tag writes a control tag before each prompt (`<zh><fable> 从前有座山`): the model reads those it
has a piece for (`loaded.control_tags` lists them; the playground shows them) and leaves others out.
--stream prints the story as it is written (storygen-serve's StreamStory over gRPC, or :stream
over REST), with generate's parameters, all of which it needs.

It uses only tensorflow-serving-api's gRPC stubs (or plain HTTP for --rest), nothing of the
server's, so it shows how any program can call the model. Sampling parameters are sent only when
given, in the serving contract's dtypes; a signature that needs one that is missing says so.
"""

import base64
import contextlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

from absl import flags

from components import cli, control_tags
from components.common import UserError
from components.contract import DEFAULT_SIGNATURE, PARAMETER_DTYPES, SIGNATURES

FLAGS = flags.FLAGS


def define_flags():
    """Defines the client's flags (in a function, so importing this module defines none)."""
    flags.DEFINE_string("server", "localhost:8500", "gRPC address of the model server (host:port).")
    flags.DEFINE_string("rest", None, "Use the REST API at this URL (e.g. http://localhost:8501) instead of gRPC.")
    flags.DEFINE_string("model_name", "storygen", "Model name on the server.")
    flags.DEFINE_integer("model_version", None, "Version to ask for; default: the newest the server has.")
    flags.DEFINE_string("model_version_label", None, "Version label to ask for instead (e.g. stable).")
    story_writers = [name for name, signature in SIGNATURES.items() if "story" in signature.output_names
                     and all(tensor.name == "prompt" or tensor.shape == () for tensor in signature.inputs)]
    flags.DEFINE_enum("signature", DEFAULT_SIGNATURE, story_writers, "Signature to call (one that writes stories).")
    flags.DEFINE_multi_string("prompt", None, "Prompt to continue; repeat the flag for a batch.")
    flags.mark_flag_as_required("prompt")
    flags.DEFINE_multi_string("tag", [], "Control tag to write with, such as a language (zh, en) or a genre (fable, "
                              "fairy_tale): written before each prompt as <tag>. Repeat the flag for several.")
    flags.DEFINE_integer("max_new_tokens", None, "Most tokens to generate.")
    flags.DEFINE_float("temperature", None, "Sampling temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens; 0 turns it off.")
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1]; 1 turns it off.")
    flags.DEFINE_integer("seed", None, "Sampling seed, for reproducible stories.")
    flags.DEFINE_integer("num_beams", None, "Beams, for the beam_search signature.")
    flags.DEFINE_bool("stream", False, "Print the story as it is written (one prompt; generate's parameters).")
    flags.DEFINE_float("timeout", 120, "Seconds to wait for the answer.")


class ClientError(UserError):
    """The server refused or could not be reached; the message says why."""


def _request(model_name: str, signature: str, prompts: list[str], parameters: dict, version, label):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    elif label:
        request.model_spec.version_label = label
    request.inputs["prompt"].CopyFrom(tf.make_tensor_proto([p.encode("utf-8") for p in prompts], dtype=tf.string,
                                                           shape=[len(prompts)]))
    for name, value in parameters.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=PARAMETER_DTYPES[name]))
    return request


def predict_grpc(target: str, model_name: str, signature: str, prompts: list[str], parameters: dict, *,
                 version: int | None = None, label: str | None = None, timeout: float = 120) -> list[str]:
    """The stories for `prompts` from the PredictionService at `target`."""
    cli.import_tensorflow()
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = _request(model_name, signature, prompts, parameters, version, label)
    request.output_filter.append("story")  # token ids and scores are not printed: do not send them
    with grpc.insecure_channel(target) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError(f"{target} answered {e.code().name}: {e.details()}") from None
    return [story.decode("utf-8", errors="replace") for story in tf.make_ndarray(response.outputs["story"]).ravel()]


def stream_grpc(target: str, model_name: str, prompt: str, parameters: dict, *, version: int | None = None,
                label: str | None = None, timeout: float = 120) -> Iterator[str]:
    """The pieces of the story for `prompt` as storygen-serve's StreamStory at `target` writes them."""
    cli.import_tensorflow()
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = _request(model_name, "generate", [prompt], parameters, version, label)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream("/storygen.StoryService/StreamStory",
                                    request_serializer=predict_pb2.PredictRequest.SerializeToString,
                                    response_deserializer=predict_pb2.PredictResponse.FromString)
        try:
            for response in call(request, timeout=timeout):
                yield tf.make_ndarray(response.outputs["text"])[0].decode("utf-8")
        except grpc.RpcError as e:
            raise ClientError(f"{target} answered {e.code().name}: {e.details()}") from None


def stream_rest(base_url: str, model_name: str, prompt: str, parameters: dict, *, version: int | None = None,
                label: str | None = None, timeout: float = 120) -> Iterator[str]:
    """The pieces of the story for `prompt` as the REST API's :stream at `base_url` writes them."""
    url = _model_url(base_url, model_name, version, label) + ":stream"
    body = {"inputs": {"prompt": [prompt], **parameters}}
    request = urllib.request.Request(url, data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    with _opened(request, url, timeout) as response:
        event = "message"
        for line in response:  # server-sent events: "event: ..." and "data: ..." lines, a blank line after each
            line = line.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if event == "error":
                    raise ClientError(f"{url} stopped the story: {data['error']}")
                yield data["text"]


def _model_url(base_url: str, model_name: str, version: int | None, label: str | None) -> str:
    url = f"{base_url.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{version}"
    elif label:
        url += f"/labels/{label}"
    return url


@contextlib.contextmanager
def _opened(request: urllib.request.Request, url: str, timeout: float):
    """urlopen(request), its failures as ClientErrors."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            yield response
    except urllib.error.HTTPError as e:
        raise ClientError(f"{url} answered HTTP {e.code}: {_error_message(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"Cannot reach {url}: {getattr(e, 'reason', e)}.") from None


def predict_rest(base_url: str, model_name: str, signature: str, prompts: list[str], parameters: dict, *,
                 version: int | None = None, label: str | None = None, timeout: float = 120) -> list[str]:
    """The stories for `prompts` from the REST API at `base_url` (columnar "inputs" format)."""
    url = _model_url(base_url, model_name, version, label) + ":predict"
    body = {"signature_name": signature, "inputs": {"prompt": prompts, **parameters}}
    request = urllib.request.Request(url, data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    with _opened(request, url, timeout) as response:
        outputs = json.loads(response.read())["outputs"]
    stories = outputs["story"] if isinstance(outputs, dict) else outputs
    return [story if isinstance(story, str) else _b64_text(story) for story in stories]


def _error_message(error: urllib.error.HTTPError) -> str:
    body = error.read()
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", errors="replace") or error.reason


def _b64_text(value: dict) -> str:
    """A story the server sent as {"b64": ...} because it is not valid UTF-8."""
    return base64.b64decode(value["b64"]).decode("utf-8", errors="replace")


def _run(args):
    parameters = {name: FLAGS[name].value for name in PARAMETER_DTYPES if FLAGS[name].value is not None}
    bad = [tag for tag in FLAGS.tag if not re.fullmatch(control_tags.TAG, tag)]
    if bad:
        raise UserError(f"--tag {bad[0]!r} cannot be a control tag: a tag has no spaces and no angle brackets.")
    prompts = [control_tags.tagged(prompt, FLAGS.tag) for prompt in FLAGS.prompt]
    if FLAGS.stream:
        if len(prompts) != 1:
            raise UserError("--stream writes one story: give one --prompt.")
        stream = stream_rest if FLAGS.rest else stream_grpc
        for text in stream(FLAGS.rest or FLAGS.server, FLAGS.model_name, prompts[0], parameters,
                           version=FLAGS.model_version, label=FLAGS.model_version_label, timeout=FLAGS.timeout):
            print(text, end="", flush=True)
        print()
        return
    predict = predict_rest if FLAGS.rest else predict_grpc
    stories = predict(FLAGS.rest or FLAGS.server, FLAGS.model_name, FLAGS.signature, prompts, parameters,
                      version=FLAGS.model_version, label=FLAGS.model_version_label, timeout=FLAGS.timeout)
    for story in stories:
        print(story)


def main():
    """Console script entry point (`storygen-client`)."""
    define_flags()
    # REST needs no TensorFlow; gRPC imports it when it builds the request.
    cli.run(_run, uses_tensorflow=False)


if __name__ == "__main__":
    main()
