"""Dynamic batching: the Batcher in-process with a fake model (merging, keys, full batches, queue
limit, deadlines, isolation of a bad request), then a server with --enable_batching: fewer model
calls than requests with every client getting its own answer, RESOURCE_EXHAUSTED / HTTP 429 when
the queue is full, and DEADLINE_EXCEEDED from the gRPC deadline."""

import contextlib
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from serving.batching import Batcher
from serving.errors import ServingError, invalid_argument
from serving_fixtures import expected_generation, predict_request, serve_stub_versions, stories

CODE = grpc.StatusCode
BATCH = frozenset({"x"})


class FakeModel:
    """Doubles x and echoes the scalar `s`; records each call's rows; fails on negative rows;
    sets `started` when called, then waits for `gate` if given, or `seconds`."""

    def __init__(self, gate: threading.Event | None = None, seconds: float = 0):
        self.calls = []
        self.gate = gate
        self.seconds = seconds
        self.started = threading.Event()

    def __call__(self, inputs, cancellation=None):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.seconds)
        self.calls.append(inputs["x"].tolist())
        if (inputs["x"] < 0).any():
            raise invalid_argument("x must be >= 0")
        return {"y": inputs["x"] * 2, "s": np.full(len(inputs["x"]), inputs["s"])}


def submit(batcher, model, x, s=0, deadline=None):
    return batcher.submit(("model", s), model, {"x": np.array(x), "s": np.array(s)}, BATCH, deadline)


def submit_all(batcher, model, requests):
    """Submits (x, s) pairs at once from threads while another request's batch holds the batch
    thread (an idle batcher runs the first request at once, alone), then lets that batch finish;
    returns each request's outputs or error."""
    with holding_a_batch_thread(batcher) as release, futures.ThreadPoolExecutor(len(requests)) as pool:
        results = [pool.submit(submit, batcher, model, *request) for request in requests]
        time.sleep(0.3)  # every request is waiting now
        release.set()
        return [error_or_result(result) for result in results]


def error_or_result(future):
    try:
        return future.result()
    except ServingError as e:
        return e


@contextlib.contextmanager
def holding_a_batch_thread(batcher, rows=1, s="held"):
    """Runs a request of its own (`rows` rows, scalar `s`) on one batch thread until the block
    ends, or until the Event it yields is set."""
    gate = threading.Event()
    model = FakeModel(gate)
    with futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(submit, batcher, model, list(range(rows)), s)
        assert model.started.wait(5)
        yield gate
        gate.set()
        assert held.result()["y"].tolist() == [2 * i for i in range(rows)]


@pytest.fixture
def make_batcher():
    batchers = []

    def make(max_batch_size=8, timeout_s=0.2, max_enqueued_batches=10, threads=1, allowed_batch_sizes=()):
        batchers.append(Batcher(max_batch_size, timeout_s, max_enqueued_batches, threads, allowed_batch_sizes))
        return batchers[-1]

    yield make
    for batcher in batchers:
        batcher.stop()


def test_concurrent_requests_share_one_call_and_get_their_own_rows(make_batcher):
    model = FakeModel()
    results = submit_all(make_batcher(), model, [([i], 0) for i in range(5)])
    assert len(model.calls) == 1 and sorted(model.calls[0]) == [0, 1, 2, 3, 4]
    assert [r["y"].tolist() for r in results] == [[0], [2], [4], [6], [8]]


def test_requests_with_different_scalars_are_not_merged(make_batcher):
    model = FakeModel()
    results = submit_all(make_batcher(), model, [([1], 7), ([2], 8), ([3, 4], 7)])
    assert sorted(map(sorted, model.calls)) == [[1, 3, 4], [2]]
    assert [r["s"].tolist() for r in results] == [[7], [8], [7, 7]]
    assert results[2]["y"].tolist() == [6, 8]


def test_a_batch_is_padded_to_the_smallest_allowed_size_with_its_first_row(make_batcher):
    model = FakeModel()
    results = submit_all(make_batcher(allowed_batch_sizes=(2, 4, 8)), model, [([i + 1], 0) for i in range(3)])
    assert len(model.calls) == 1 and len(model.calls[0]) == 4
    assert model.calls[0][3] == model.calls[0][0]  # the padding repeats the first row
    assert sorted(r["y"].tolist() for r in results) == [[2], [4], [6]]  # and is cut from the outputs
    with pytest.raises(ValueError, match="must increase and end with max_batch_size"):
        Batcher(8, 0.1, 10, 1, (2, 4))


def test_a_full_batch_runs_without_waiting_for_the_timeout(make_batcher):
    model = FakeModel()
    batcher = make_batcher(max_batch_size=2, timeout_s=30, threads=2)
    with holding_a_batch_thread(batcher), futures.ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        results = [pool.submit(submit, batcher, model, [i], 0) for i in (1, 2)]
        assert [r.result(timeout=5)["y"].tolist() for r in results] == [[2], [4]]
    assert time.monotonic() - start < 5 and model.calls == [[1, 2]]


def test_a_lone_request_runs_at_once_when_no_batch_is_running(make_batcher):
    model = FakeModel()
    start = time.monotonic()
    assert submit(make_batcher(timeout_s=30), model, [3])["y"].tolist() == [6]
    assert time.monotonic() - start < 5 and model.calls == [[3]]


def test_behind_a_running_batch_a_request_waits_for_the_timeout_to_gather_others(make_batcher):
    model = FakeModel()
    batcher = make_batcher(timeout_s=0.5, threads=2)  # a batch thread is free, yet the request waits
    with holding_a_batch_thread(batcher), futures.ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        first = pool.submit(submit, batcher, model, [1], 0)
        time.sleep(0.2)
        second = pool.submit(submit, batcher, model, [2], 0)
        assert first.result(timeout=5)["y"].tolist() == [2] and second.result(timeout=5)["y"].tolist() == [4]
        assert time.monotonic() - start >= 0.5
    assert model.calls == [[1, 2]]


def run_a_batch_for(batcher, seconds, rows):
    """Runs one request of `rows` rows (scalar 0) that takes `seconds`, and waits for its answer."""
    with holding_a_batch_thread(batcher, rows, s=0):
        time.sleep(seconds)


def test_the_callers_of_a_finished_batch_are_awaited_and_batched_together_again(make_batcher):
    """A 3-row batch ran for 3 s; its callers come back 0, 30 and 60 ms later. Nothing runs, so the
    first alone would run at once, but a tenth of that batch's run is given for all three."""
    model = FakeModel()
    batcher = make_batcher(timeout_s=0.001)
    run_a_batch_for(batcher, 3, rows=3)
    with futures.ThreadPoolExecutor(3) as pool:
        back = [pool.submit(lambda i: (time.sleep(0.03 * i), submit(batcher, model, [i], 0))[1], i) for i in range(3)]
        assert [f.result(timeout=5)["y"].tolist() for f in back] == [[0], [2], [4]]
    assert model.calls == [[0, 1, 2]]


def test_callers_that_do_not_come_back_hold_the_next_batch_a_tenth_of_the_last_run_at_most(make_batcher):
    """Only one of a 3 s batch's three rows comes back: it waits about 0.3 s. A request that could
    not have shared that batch (another scalar) does not wait."""
    model = FakeModel()
    batcher = make_batcher(timeout_s=0.001)
    run_a_batch_for(batcher, 3, rows=3)
    start = time.monotonic()
    assert submit(batcher, model, [5], s=1)["s"].tolist() == [1]
    assert time.monotonic() - start < 0.2
    assert submit(batcher, model, [4])["y"].tolist() == [8]
    assert 0.2 < time.monotonic() - start < 1.5
    assert model.calls == [[5], [4]]


def test_waiting_rows_are_shared_out_among_the_batch_threads(make_batcher):
    """Eight rows wait behind a running batch; once it is done, each of two threads takes four."""
    model = FakeModel(seconds=0.5)
    batcher = make_batcher(max_batch_size=16, timeout_s=30, threads=2)
    with holding_a_batch_thread(batcher) as release, futures.ThreadPoolExecutor(8) as pool:
        results = [pool.submit(submit, batcher, model, [i], 0) for i in range(8)]
        time.sleep(0.3)
        assert not model.started.is_set()  # not full, and within the timeout: they wait while a batch runs
        release.set()
        assert [r.result(timeout=5)["y"].tolist() for r in results] == [[2 * i] for i in range(8)]
    assert sorted(map(len, model.calls)) == [4, 4] and sorted(sum(model.calls, [])) == list(range(8))


def test_batches_never_exceed_max_batch_size(make_batcher):
    model = FakeModel()
    results = submit_all(make_batcher(max_batch_size=4), model, [([i, i], 0) for i in range(5)])
    assert all(len(call) <= 4 for call in model.calls) and sum(map(len, model.calls)) == 10
    assert [r["y"].tolist() for r in results] == [[2 * i, 2 * i] for i in range(5)]
    with pytest.raises(ServingError, match="split it"):
        submit(make_batcher(max_batch_size=2), model, [1, 2, 3])


def test_a_full_queue_rejects_at_once_with_resource_exhausted(make_batcher):
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = make_batcher(timeout_s=0, max_enqueued_batches=1)
    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(submit, batcher, model, [1], 1)  # taken by the batch thread, held at the gate
        time.sleep(0.2)
        waiting = pool.submit(submit, batcher, model, [2], 2)  # fills the queue
        time.sleep(0.2)
        with pytest.raises(ServingError) as error:
            submit(batcher, model, [3], 3)
        assert error.value.code == CODE.RESOURCE_EXHAUSTED and error.value.http_status == 429
        gate.set()
        assert running.result()["y"].tolist() == [2] and waiting.result()["y"].tolist() == [4]


def test_a_request_past_its_deadline_fails_and_is_not_run(make_batcher):
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = make_batcher(timeout_s=0)
    with futures.ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(submit, batcher, model, [1], 1)
        time.sleep(0.2)
        with pytest.raises(ServingError) as error:
            submit(batcher, model, [2], 2, deadline=time.monotonic() + 0.2)
        assert error.value.code == CODE.DEADLINE_EXCEEDED
        gate.set()
        blocker.result()
    batcher.stop()
    assert model.calls == [[1]]


def test_a_request_whose_caller_has_already_gone_is_cancelled_and_not_run(make_batcher):
    model = FakeModel()
    batcher = make_batcher(timeout_s=0)
    with pytest.raises(ServingError) as error:  # gRPC's add_callback returns False once the call has ended
        batcher.submit(("model", 0), model, {"x": np.array([1]), "s": np.array(0)}, BATCH,
                       on_caller_gone=lambda callback: False)
    assert error.value.code == CODE.CANCELLED
    submit(batcher, model, [2])
    assert model.calls == [[2]]


def test_a_bad_request_does_not_fail_the_requests_merged_with_it(make_batcher):
    model = FakeModel()
    good, bad = submit_all(make_batcher(), model, [([1], 0), ([-1], 0)])
    assert good["y"].tolist() == [2]
    assert isinstance(bad, ServingError) and bad.message == "x must be >= 0"


def test_stop_runs_the_waiting_batches_first():
    batcher = Batcher(8, 30, 10, 2)
    model = FakeModel()
    with holding_a_batch_thread(batcher) as release, futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(submit, batcher, model, [5], 0)  # behind the held batch: waits for its 30 s timeout
        time.sleep(0.2)
        stopping = threading.Thread(target=batcher.stop)
        stopping.start()
        assert waiting.result(timeout=5)["y"].tolist() == [10]
        release.set()
    stopping.join(5)
    assert not stopping.is_alive()
    with pytest.raises(ServingError) as error:
        submit(batcher, model, [1])
    assert error.value.code == CODE.UNAVAILABLE


# ---------------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Batching on with small limits: 4 rows per batch, 2 waiting batches, one batch at a time."""
    with serve_stub_versions(tmp_path_factory.mktemp("serving_batching"), [1], "--enable_batching",
                             "--max_batch_size=4", "--batch_timeout_micros=100000", "--max_enqueued_batches=2",
                             "--num_batch_threads=1", "--max_new_tokens_limit=15000") as process:
        yield process


def generate(server, prompt, seed, max_new_tokens, rest=False, timeout=30):
    """One generate request over gRPC or REST; returns the story or the gRPC code / HTTP status."""
    params = dict(max_new_tokens=max_new_tokens, temperature=0.5, top_k=40, top_p=0.9, seed=seed)
    if rest:
        status, body = server.rest("/v1/models/storygen:predict",
                                   {"signature_name": "generate", "inputs": {"prompt": [prompt], **params}})
        return body["outputs"]["story"][0] if status == 200 else status
    try:
        return stories(server.predict([prompt], "generate", timeout=timeout, **params))[0]
    except grpc.RpcError as e:
        return e.code()


def test_server_merges_concurrent_requests_and_answers_each_client(server):
    calls, rows = server.metric("storygen_model_calls_total"), server.metric("storygen_model_rows_total")
    prompts = [f"故事 {i}" if i % 2 else f"story {i}" for i in range(8)]
    barrier = threading.Barrier(len(prompts))

    def client(i):
        barrier.wait()
        return generate(server, prompts[i], seed=7, max_new_tokens=200, rest=i % 4 == 3)

    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(client, range(len(prompts))))
    assert answers == [expected_generation(p, 1, 200, 40, 7) for p in prompts]
    assert server.metric("storygen_model_rows_total") - rows == 8
    assert server.metric("storygen_model_calls_total") - calls < 8


def test_full_queue_answers_resource_exhausted_and_http_429(server):
    slow = 1000  # ms per batch: the first batch runs while the rest wait
    with futures.ThreadPoolExecutor(12) as pool:
        # Different seeds cannot share a batch, so each request needs a batch of its own.
        first_wave = [pool.submit(generate, server, "早", seed, slow) for seed in range(8)]
        time.sleep(0.4)  # one batch is running, one waits: one slot left
        second_wave = [pool.submit(generate, server, "晚", seed, slow) for seed in range(100, 103)]
        time.sleep(0.2)
        assert generate(server, "rest", 999, slow, rest=True) == 429
        answers = [f.result() for f in first_wave + second_wave]
    rejected = answers.count(CODE.RESOURCE_EXHAUSTED)
    served = [a for a in answers if a != CODE.RESOURCE_EXHAUSTED]
    assert rejected >= 6 and len(served) >= 2
    seeds = list(range(8)) + list(range(100, 103))
    prompts = ["早"] * 8 + ["晚"] * 3
    for answer, prompt, seed in zip(answers, prompts, seeds):
        assert answer in (CODE.RESOURCE_EXHAUSTED, expected_generation(prompt, 1, slow, 40, seed))
    assert generate(server, "after", 1, 1) == expected_generation("after", 1, 1, 40, 1)


def test_grpc_deadline_is_honoured_while_batched_and_cancels_the_batch(server):
    """Its caller gone, the 15 s batch is cancelled: the next batch gets the only batch thread at once."""
    started = time.monotonic()
    assert generate(server, "slow", 5, 15000, timeout=0.5) == CODE.DEADLINE_EXCEEDED
    assert generate(server, "fast", 6, 1) == expected_generation("fast", 1, 1, 40, 6)
    assert time.monotonic() - started < 4
    assert stories(server.prediction.Predict(predict_request(["默认"]), timeout=30)) == ["默认 v1"]
