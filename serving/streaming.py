"""A story streamed as it is written, from a stateless SavedModel: the `continue_story`
signature is called again and again, each call for a few more tokens after the story so far,
and what each call adds to the story goes to the client at once (REST server-sent events in
rest.py, a server-streaming gRPC method in grpc_service.py).

A stream takes `generate`'s inputs for one prompt, and its pieces put together are the story
that one `generate` call with those inputs writes. The first call writes FIRST_CALL_TOKENS
tokens, so that text reaches the client within a fraction of a second; each later call is
sized to take about CALL_SECONDS, so that what every call costs whatever its length (reading
the prompt and the story so far, a few milliseconds) is a small share of the time. The pace
that sizes a call is the version's seconds per token on its latest call of at least
PACED_CALL_TOKENS tokens (the first call's pace, mostly that fixed cost, until there is one):
a small model writes a 250-token story in about 0.1 s, so its stream is then two calls.
"""

import dataclasses
import time
import weakref
from collections.abc import Iterator

import numpy as np

from serving.errors import failed_precondition, invalid_argument
from serving.model_manager import Servable, Signature
from serving.predictor import Predictor

REQUEST_SIGNATURE = "generate"  # whose inputs a stream request sends
STREAM_SIGNATURE = "continue_story"
FIRST_CALL_TOKENS = 4
CALL_SECONDS = 0.5
PACED_CALL_TOKENS = 16
# What a decoder makes of a character whose bytes are not all written yet: held back until they are.
UNFINISHED_CHARACTER = "\ufffd"


# Servable -> seconds per token on its latest call of PACED_CALL_TOKENS or more.
_pace = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str  # what this call added to the story
    num_tokens: int  # the story's, so far
    log_prob: float  # the story's, so far
    done: bool  # the story ended (EOS) or reached max_new_tokens: the stream's last piece


def find(predictor: Predictor, name: str, version: int | None, label: str | None) -> tuple[Servable, Signature]:
    """The version that will write a stream, and the signature whose inputs the request sends."""
    servable = predictor.models.resolve(name, version, label)
    if STREAM_SIGNATURE not in servable.signatures:
        raise failed_precondition(f"Version {servable.version} of model '{servable.name}' has no "
                                  f"'{STREAM_SIGNATURE}' signature to stream with; export it again with this "
                                  f"storygen.")
    return servable, servable.signature(REQUEST_SIGNATURE)


def stream(predictor: Predictor, servable: Servable, inputs: dict[str, np.ndarray], deadline: float | None = None,
           on_caller_gone=None) -> Iterator[Piece]:
    """The pieces of the story that `generate` writes for `inputs` (one prompt), as they are
    written. The request is checked before the first model call, so a bad one raises before
    anything is sent; `deadline` and `on_caller_gone` are Predictor.predict's, for the whole stream."""
    predictor.check(servable.signature(REQUEST_SIGNATURE), inputs)
    if inputs["prompt"].shape != (1,):
        raise invalid_argument(f"A stream writes one story: 'prompt' must hold one string, not "
                               f"{inputs['prompt'].size}.")
    return _pieces(predictor, servable, inputs, deadline, on_caller_gone)


def _pieces(predictor, servable, inputs, deadline, on_caller_gone) -> Iterator[Piece]:
    continue_story = servable.signature(STREAM_SIGNATURE)
    max_new_tokens = int(inputs["max_new_tokens"])
    request = {name: array for name, array in inputs.items() if name != "max_new_tokens"}
    token_ids = np.zeros([1, 0], np.int32)
    sent, log_prob, call_tokens = "", 0.0, FIRST_CALL_TOKENS
    while True:
        written = token_ids.shape[1]
        start = time.monotonic()
        outputs = predictor.predict(
            servable, continue_story,
            {**request, "token_ids": token_ids, "max_new_tokens": np.int32(min(call_tokens, max_new_tokens - written))},
            deadline=deadline, on_caller_gone=on_caller_gone)
        elapsed = time.monotonic() - start
        new_tokens = outputs["token_ids"].shape[1] - written
        if new_tokens >= PACED_CALL_TOKENS:
            _pace[servable] = elapsed / new_tokens
        token_ids = outputs["token_ids"]
        num_tokens = int(outputs["num_tokens"][0])
        log_prob += float(outputs["log_prob"][0])
        # An EOS is in token_ids but not counted in num_tokens.
        done = num_tokens < token_ids.shape[1] or token_ids.shape[1] >= max_new_tokens
        story = outputs["story"][0].decode("utf-8", errors="replace")
        settled = story if done else story.rstrip(UNFINISHED_CHARACTER)
        yield Piece(settled[len(sent):], num_tokens, log_prob, done)
        if done:
            return
        sent = settled
        seconds_per_token = _pace.get(servable, elapsed / max(new_tokens, 1))
        call_tokens = max(FIRST_CALL_TOKENS, round(CALL_SECONDS / max(seconds_per_token, 1e-6)))
