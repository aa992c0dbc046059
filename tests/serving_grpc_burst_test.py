"""A burst of simultaneous gRPC calls against a real server process: every call is answered by
storygen-serve and counted, or, beyond --grpc_max_concurrent_rpcs, refused at once with
RESOURCE_EXHAUSTED. None may be dropped by gRPC itself (CANCELLED, never seen by the server),
which gRPC core does to calls that wait past its pending-call limit (1,000 by default)."""

import collections

import grpc

from serving_fixtures import predict_request, serve_stub_versions

BURST = 3000


def burst_codes(server) -> collections.Counter:
    """Status codes of BURST Predict calls sent at once on one channel."""
    request = predict_request(["从前有座山"])
    calls = [server.prediction.Predict.future(request, timeout=120) for _ in range(BURST)]
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
    with serve_stub_versions(tmp_path, [1], "--file_system_poll_wait_seconds=0",
                             "--grpc_max_concurrent_rpcs=100") as server:
        codes = burst_codes(server)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert server.metric("storygen_requests_total", protocol="grpc", method="Predict",
                             code="OK") == codes[grpc.StatusCode.OK]
