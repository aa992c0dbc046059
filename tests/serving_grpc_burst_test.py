"""A burst of simultaneous gRPC calls against a real server process: every call is answered by
storygen-serve and counted, or, beyond --grpc_max_concurrent_rpcs, refused at once with
RESOURCE_EXHAUSTED. None may be dropped by gRPC itself (CANCELLED, never seen by the server),
which gRPC core does to calls that wait past its pending-call limit (1,000 by default)."""

import collections

import grpc

from serving_fixtures import predict_request, serve_stub_versions

BURST = 3000


def burst_codes(server, count: int = BURST, request=None) -> collections.Counter:
    """Status codes of `count` Predict calls (of `request`, by default a story) sent at once on one channel."""
    request = request or predict_request(["从前有座山"])
    calls = [server.prediction.Predict.future(request, timeout=120) for _ in range(count)]
    codes = collections.Counter()
    for call in calls:
        try:
            call.result()
            codes[grpc.StatusCode.OK] += 1
        except grpc.RpcError as e:
            codes[e.code()] += 1
    return codes


def test_3000_simultaneous_calls_are_all_answered_and_counted(tmp_path):
    with serve_stub_versions(tmp_path, [1], "--file_system_poll_wait_seconds=0") as server:
        codes = burst_codes(server)
        assert codes == {grpc.StatusCode.OK: BURST}
        assert server.metric("storygen_requests_total", protocol="grpc", method="Predict", code="OK") == BURST


def test_calls_beyond_the_concurrency_limit_are_refused_with_resource_exhausted(tmp_path):
    # The stub's generate sleeps 50 ms in the graph, so the first 100 calls take seconds to answer, far
    # longer than sending the burst takes: the limit binds.
    slow = predict_request(["从前有座山"], "generate", max_new_tokens=50, temperature=0.5, top_k=40, top_p=0.9,
                           seed=3)
    with serve_stub_versions(tmp_path, [1], "--file_system_poll_wait_seconds=0",
                             "--grpc_max_concurrent_rpcs=100") as server:
        codes = burst_codes(server, 300, slow)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes[grpc.StatusCode.OK] >= 100, codes
        assert server.metric("storygen_requests_total", protocol="grpc", method="Predict",
                             code="OK") == codes[grpc.StatusCode.OK]
