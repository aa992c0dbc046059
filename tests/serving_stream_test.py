"""Streaming a story from a served tiny export: gRPC's StreamStory and REST's :stream send the
story in pieces as it is written, the pieces make up the story that `generate` writes for the
same inputs, a caller that goes stops the model calls, the client prints the stream, and the
playground page shows it in a real headless browser (Debian's chromium, driven by Selenium;
its screenshot is kept in test-artifacts/)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from components import exporter
from components.config import ExportConfig
from components.tokenizer import make_tokenizer
from serving.grpc_service import STREAM_STORY
from serving.streaming import FIRST_CALL_TOKENS
from serving_fixtures import MODEL_NAME, REPO, ServerProcess, predict_request, stories

ARTIFACTS = pathlib.Path(REPO) / "test-artifacts"
PROMPT = "从前有座山，"
SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.95, seed=5)


@pytest.fixture(scope="module")
def model_base_path(tiny_model, spm_proto, tmp_path_factory):
    """The tiny model exported as version 1 of a model base path."""
    root = tmp_path_factory.mktemp("stream")
    saved_model = exporter.export(tiny_model, make_tokenizer(spm_proto), str(root / "export"),
                                  ExportConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens_limit=2048))
    shutil.move(saved_model, root / MODEL_NAME / "1")
    return root / MODEL_NAME


@pytest.fixture(scope="module")
def server(model_base_path):
    process = ServerProcess(str(model_base_path), model_base_path.parent / "server.log",
                            "--file_system_poll_wait_seconds=0")
    try:
        yield process.wait_ready(1)
    finally:
        process.stop()


def generated_story(server, prompt, **params) -> str:
    return stories(server.predict([prompt], "generate", **params))[0]


def stream_grpc(server, prompt, timeout=60, **params):
    """StreamStory's responses for `prompt` (a list of prompts, for a request of several)."""
    call = server.channel.unary_stream(STREAM_STORY, request_serializer=predict_pb2.PredictRequest.SerializeToString,
                                       response_deserializer=predict_pb2.PredictResponse.FromString)
    return call(predict_request(prompt if isinstance(prompt, list) else [prompt], **params), timeout=timeout)


def sse_events(server, body: dict) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a REST :stream answer."""
    request = urllib.request.Request(f"{server.rest_url}/v1/models/{MODEL_NAME}:stream", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events, event = [], "message"
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            line = line.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
                event = "message"
    return events


@pytest.mark.parametrize("prompt, params", [(PROMPT, dict(max_new_tokens=60, **SAMPLING)),
                                            ("Once upon a time", dict(max_new_tokens=60, **SAMPLING)),
                                            (PROMPT, dict(max_new_tokens=200, temperature=0.0, top_k=0, top_p=1.0,
                                                          seed=0))])
def test_grpc_stream_sends_the_generated_story_in_pieces(server, prompt, params):
    pieces = list(stream_grpc(server, prompt, **params))
    texts = [tf.make_ndarray(p.outputs["text"])[0].decode("utf-8") for p in pieces]
    num_tokens = [int(tf.make_ndarray(p.outputs["num_tokens"])[0]) for p in pieces]
    assert len(pieces) > 1 and num_tokens[0] == FIRST_CALL_TOKENS < num_tokens[-1]
    assert num_tokens == sorted(num_tokens)
    assert "".join(texts) == generated_story(server, prompt, **params)
    assert (pieces[0].model_spec.name, pieces[0].model_spec.version.value) == (MODEL_NAME, 1)


def test_rest_stream_sends_the_generated_story_as_server_sent_events(server):
    events = sse_events(server, {"inputs": {"prompt": [PROMPT], "max_new_tokens": 60, **SAMPLING}})
    assert len(events) > 1 and all(event == "message" for event, _ in events)
    assert [data["done"] for _, data in events] == [False] * (len(events) - 1) + [True]
    assert {data["model_version"] for _, data in events} == {1}
    assert "".join(data["text"] for _, data in events) == generated_story(server, PROMPT, max_new_tokens=60,
                                                                          **SAMPLING)
    whole = server.predict([PROMPT], "generate", max_new_tokens=60, **SAMPLING)
    assert events[-1][1]["num_tokens"] == int(tf.make_ndarray(whole.outputs["num_tokens"])[0])
    assert events[-1][1]["log_prob"] == pytest.approx(float(tf.make_ndarray(whole.outputs["log_prob"])[0]), abs=1e-3)


@pytest.mark.parametrize("inputs, message", [
    ({"prompt": [PROMPT, PROMPT], "max_new_tokens": 8, **SAMPLING}, "A stream writes one story"),
    ({"prompt": [PROMPT], "max_new_tokens": 8, "temperature": 0.5}, "needs input(s) seed, top_k, top_p"),
    ({"prompt": [PROMPT], "max_new_tokens": 5000, **SAMPLING}, "max_new_tokens is 5000"),
])
def test_a_stream_the_model_cannot_write_is_refused_before_it_starts(server, inputs, message):
    status, body = server.rest(f"/v1/models/{MODEL_NAME}:stream", {"inputs": inputs})
    assert status == 400 and message in body["error"]
    with pytest.raises(grpc.RpcError) as raised:
        list(stream_grpc(server, inputs["prompt"], **{k: v for k, v in inputs.items() if k != "prompt"}))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()


def test_a_caller_that_goes_stops_the_stream(server):
    """Greedy decoding of the tiny model's weights never writes EOS: this stream would take
    2,000 tokens, but its caller leaves after the first piece."""
    calls = server.metric("storygen_model_calls_total")
    stream = stream_grpc(server, PROMPT, max_new_tokens=2000, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    next(stream)
    stream.cancel()
    time.sleep(1.0)
    settled = server.metric("storygen_model_calls_total")
    time.sleep(1.0)
    assert server.metric("storygen_model_calls_total") == settled < calls + 10
    assert server.metric("storygen_requests_total", method="StreamStory", code="CANCELLED") >= 1


def test_a_rest_stream_past_its_deadline_ends_with_an_error_event(model_base_path, tmp_path):
    """2,000 greedy tokens (the tiny weights never write EOS) take longer than a 0.4 s deadline:
    the pieces written by then are sent, then an error event, and the model calls stop."""
    server = ServerProcess(str(model_base_path), tmp_path / "server.log", "--file_system_poll_wait_seconds=0",
                           "--rest_api_timeout_in_ms=400")
    try:
        server.wait_ready(1)
        events = sse_events(server, {"inputs": {"prompt": [PROMPT], "max_new_tokens": 2000, "temperature": 0.0,
                                                "top_k": 0, "top_p": 1.0, "seed": 0}})
        assert [event for event, _ in events[:-1]] == ["message"] * (len(events) - 1) and len(events) > 1
        assert events[-1][0] == "error" and "deadline passed" in events[-1][1]["error"].lower()
        assert not any(data["done"] for _, data in events[:-1])
        time.sleep(0.5)
        calls = server.metric("storygen_model_calls_total")
        time.sleep(1.0)
        assert server.metric("storygen_model_calls_total") == calls
        assert server.metric("storygen_requests_total", method="StreamStory", code="DEADLINE_EXCEEDED") == 1
    finally:
        server.stop()


def test_the_client_prints_the_story_as_it_streams(server):
    """Over gRPC untagged, over REST with control tags (written before the prompt)."""
    params = dict(max_new_tokens=40, **SAMPLING)
    flags = [f"--{name}={value}" for name, value in params.items()]
    tagged = (["--tag=zh", "--tag=fable"], "<zh><fable> " + PROMPT)
    for transport, (tags, prompt) in (([f"--server={server.target}"], ([], PROMPT)),
                                      ([f"--rest={server.rest_url}"], tagged)):
        result = subprocess.run([sys.executable, "-m", "serving.client", "--stream", f"--prompt={PROMPT}", *tags,
                                 *flags, *transport], cwd=REPO, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"))
        assert result.returncode == 0, result.stderr
        assert result.stdout == generated_story(server, prompt, **params) + "\n"


@pytest.fixture
def browser():
    """Headless chromium under Selenium; skipped where chromium is not installed, except in CI
    (`.ci/run` installs it)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("needs Debian's chromium and chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_playground_streams_a_story_into_the_page(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.rest_url + "/")
    assert browser.title == "storygen playground"
    for field, value in (("prompt", PROMPT), ("temperature", "0"), ("max_new_tokens", "1500")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    # One checkbox per control tag of the model; the ticked ones are written before the prompt.
    boxes = {box.get_attribute("value"): box for box in browser.find_elements(By.CSS_SELECTOR, "#tags input")}
    assert set(boxes) == {"en", "zh", "fairy_tale", "dragons", "fable"}
    boxes["zh"].click()
    boxes["fable"].click()
    prompt = "<zh><fable> " + PROMPT
    story = browser.find_element(By.ID, "story")
    browser.find_element(By.ID, "write").click()
    lengths = set()  # of the story text while it is being written
    deadline = time.monotonic() + 120
    while "writing" in (story.get_attribute("class") or "") or not lengths:
        assert time.monotonic() < deadline, "the story did not finish within 120 s"
        lengths.add(len(story.text))
        time.sleep(0.05)
    assert len(lengths - {0, len(prompt)}) >= 2, f"the page showed no story growing: lengths {sorted(lengths)}"
    facts = browser.find_element(By.ID, "facts")
    deadline = time.monotonic() + 30
    while "bits per character" not in facts.text:  # the score call comes after the story
        assert time.monotonic() < deadline and not browser.find_element(By.ID, "error").text, facts.text
        time.sleep(0.05)
    assert "model version 1" in facts.text and "1500 tokens" in facts.text
    expected = generated_story(server, prompt, max_new_tokens=1500, temperature=0.0, top_k=40, top_p=0.95, seed=1)
    assert story.text == prompt + expected
    assert expected != generated_story(server, PROMPT, max_new_tokens=1500, temperature=0.0, top_k=40, top_p=0.95,
                                       seed=1)
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))


@pytest.mark.parametrize("playground", [True, False])
def test_the_playground_page_is_served_at_the_root_unless_turned_off(playground):
    """In process: the page names the served models, with their control tags, for its model
    choice; --noplayground leaves / unserved."""
    import types
    import urllib.error

    from serving.errors import not_found
    from serving.rest import RestServer
    from serving.stats import Stats
    from serving_fixtures import free_ports

    def resolve(name):
        if name == "fables":
            raise not_found("no version of 'fables' is loaded yet")
        return types.SimpleNamespace(control_tags=["en", "fable"])

    models = types.SimpleNamespace(names=lambda: ["storygen", "fables"], resolve=resolve)
    (port,) = free_ports(1)
    server = RestServer("127.0.0.1", port, types.SimpleNamespace(models=models), Stats(), max_request_bytes=1 << 16,
                        timeout_s=5, num_threads=1, playground=playground)
    server.start()
    try:
        if playground:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                assert response.headers["Content-Type"].startswith("text/html")
                page = response.read().decode("utf-8")
            assert "<title>storygen playground</title>" in page
            assert ("data-models='{&quot;storygen&quot;: [&quot;en&quot;, &quot;fable&quot;], &quot;fables&quot;: []}'"
                    in page)
        else:
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
            assert raised.value.code == 404
    finally:
        server.shutdown()
        server.close()
