r"""storygen-client: sends prompts to storygen-serve, or to a real TensorFlow Serving, and prints
the stories, one per prompt.

    python -m serving.client --server localhost:8500 --prompt 从前有座山
    python -m serving.client --prompt "Once upon a time" --signature generate \
        --max_new_tokens 64 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 7
    python -m serving.client --rest http://localhost:8501 --prompt 从前有座山

It uses only tensorflow-serving-api's gRPC stubs (or plain HTTP for --rest), nothing of the
server's, so it shows how any program can call the model. Sampling parameters are sent only when
given, in the serving contract's dtypes; a signature that needs one that is missing says so.
"""

import base64
import json
import urllib.error
import urllib.request

from absl import flags

from components import cli
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
    story_writers = [name for name, signature in SIGNATURES.items() if "story" in signature.output_names]
    flags.DEFINE_enum("signature", DEFAULT_SIGNATURE, story_writers, "Signature to call (one that writes stories).")
    flags.DEFINE_multi_string("prompt", None, "Prompt to continue; repeat the flag for a batch.")
    flags.mark_flag_as_required("prompt")
    flags.DEFINE_integer("max_new_tokens", None, "Most tokens to generate.")
    flags.DEFINE_float("temperature", None, "Sampling temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens; 0 turns it off.")
    flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1]; 1 turns it off.")
    flags.DEFINE_integer("seed", None, "Sampling seed, for reproducible stories.")
    flags.DEFINE_integer("num_beams", None, "Beams, for the beam_search signature.")
    flags.DEFINE_float("timeout", 120, "Seconds to wait for the answer.")


class ClientError(UserError):
    """The server refused or could not be reached; the message says why."""


def predict_grpc(target: str, model_name: str, signature: str, prompts: list[str], parameters: dict, *,
                 version: int | None = None, label: str | None = None, timeout: float = 120) -> list[str]:
    """The stories for `prompts` from the PredictionService at `target`."""
    cli.import_tensorflow()
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

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
    request.output_filter.append("story")  # token ids and scores are not printed: do not send them
    with grpc.insecure_channel(target) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError(f"{target} answered {e.code().name}: {e.details()}") from None
    return [story.decode("utf-8", errors="replace") for story in tf.make_ndarray(response.outputs["story"]).ravel()]


def predict_rest(base_url: str, model_name: str, signature: str, prompts: list[str], parameters: dict, *,
                 version: int | None = None, label: str | None = None, timeout: float = 120) -> list[str]:
    """The stories for `prompts` from the REST API at `base_url` (columnar "inputs" format)."""
    url = f"{base_url.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{version}"
    elif label:
        url += f"/labels/{label}"
    body = {"signature_name": signature, "inputs": {"prompt": prompts, **parameters}}
    request = urllib.request.Request(url + ":predict", data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            outputs = json.loads(response.read())["outputs"]
    except urllib.error.HTTPError as e:
        raise ClientError(f"{url} answered HTTP {e.code}: {_error_message(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"Cannot reach {url}: {getattr(e, 'reason', e)}.") from None
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
    predict = predict_rest if FLAGS.rest else predict_grpc
    stories = predict(FLAGS.rest or FLAGS.server, FLAGS.model_name, FLAGS.signature, FLAGS.prompt, parameters,
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
