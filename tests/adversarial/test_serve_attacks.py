"""Attacks on the device's local endpoint (`edge-runtime serve`) and on its remote commands:
oversized and malformed bodies, slow and idle clients, floods, hostile .npy and JSON, Unix
socket paths that are not ours, and command payloads. A real server on a real bundle
(ONNX Runtime), driven through raw sockets and http.client."""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import serve
from runtime.device import Device, command_args
from runtime.serve import MAX_BATCH, MAX_BODY, make_server, parse_inputs
from runtime.telemetry import MAX_COMMAND_BYTES, CommandError, handle_command
from tests.conftest import run_cmd
from tests.fleet_helpers import EDGE_RUNTIME, Proc

SHAPE = (1, 32, 32)  # the demo model's input


# -- helpers ---------------------------------------------------------------------------------
def npy(x: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=allow_pickle)
    return buf.getvalue()


def raw_exchange(address, data: bytes, timeout: float = 30) -> tuple[int, dict]:
    """Send `data` as it is, read the whole answer (the server closes): (status, JSON body)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while we were still sending: the answer is still there to read
        return read_answer(s)


def read_answer(s: socket.socket) -> tuple[int, dict]:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def predict_npy(port: int, x: np.ndarray) -> tuple[int, dict]:
    return request(port, "POST", "/v1/predict", npy(x), {"Content-Type": "application/x-npy"})


def assert_serving(port: int) -> None:
    """The endpoint still answers health and a good prediction."""
    status, body = request(port, "GET", "/v1/health")
    assert status == 200 and body["status"] == "ok"
    status, body = predict_npy(port, np.zeros((2, *SHAPE), np.float32))
    assert status == 200 and len(body["predictions"]) == 2, body


def close_pipes(proc: Proc) -> None:
    proc.p.stdout.close()
    proc.p.stderr.close()


def one_line_error(body: dict) -> str:
    assert set(body) == {"error"}, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert len(body["error"]) < 600, body["error"]
    return body["error"]


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(build_demo) -> Path:
    return build_demo("host-cpu").bundle


@pytest.fixture(scope="module")
def device(bundle, tmp_path_factory):
    dev = Device.open(bundle, device_id="spk-adv", spool_dir=tmp_path_factory.mktemp("spool"))
    yield dev
    dev.close(0)


@pytest.fixture(scope="module")
def port(device):
    server = make_server(device, http="127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# -- HTTP: sizes -----------------------------------------------------------------------------
def test_huge_content_length_is_refused_without_reading_the_body(port):
    # no body follows: an answer at all proves the server did not wait to read 1 TB
    status, body = raw_exchange(("127.0.0.1", port),
                                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/x-npy\r\n"
                                b"Content-Length: 1000000000000\r\n\r\n", timeout=20)
    assert status == 413
    assert str(MAX_BODY) in one_line_error(body) and "1000000000000" in body["error"]
    assert_serving(port)


def test_body_larger_than_the_cap_is_refused_while_it_is_being_sent(port):
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(MAX_BODY + 1).encode() + b"\r\n\r\n")
    status, body = raw_exchange(("127.0.0.1", port), head + b"[" * (1 << 20))
    assert status == 413 and "16 MiB" in one_line_error(body)
    assert_serving(port)


@pytest.mark.parametrize("headers, status, words", [
    (b"", 411, "Content-Length required"),
    (b"Content-Length: abc\r\n", 400, "non-negative integer"),
    (b"Content-Length: -5\r\n", 400, "non-negative integer"),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, "one non-negative integer"),
    (b"Content-Length: 0\r\n", 400, "empty body"),
    (b"Transfer-Encoding: chunked\r\n", 411, "chunked"),
    (b"Content-Length: " + b"9" * 5000 + b"\r\n", 413, "larger than the limit"),
])
def test_missing_or_invalid_content_length(port, headers, status, words):
    got, body = raw_exchange(("127.0.0.1", port),
                             b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert got == status and words in one_line_error(body)


def test_too_many_headers_get_a_json_431(port):
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(150))
    status, body = raw_exchange(("127.0.0.1", port), b"GET /v1/health HTTP/1.1\r\n" + headers
                                + b"\r\n")
    assert status == 431 and one_line_error(body)


def test_body_shorter_than_declared_is_a_400(port):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"inp")
        s.shutdown(socket.SHUT_WR)
        status, body = read_answer(s)
    assert status == 400 and "ended after 5 of 100 bytes" in one_line_error(body)


# -- HTTP: slow and many clients -------------------------------------------------------------
@pytest.mark.parametrize("sent, trickled", [
    (b"POST /v1/predict HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200),  # the headers
    (b"", b"GET /v1/health" + b"/" * 200),  # the request line itself
])
def test_slow_loris_gets_408_within_the_read_deadline_and_health_answers(port, monkeypatch,
                                                                         sent, trickled):
    monkeypatch.setattr(serve, "READ_DEADLINE_S", 1.5)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(sent)
        start = time.monotonic()
        # one byte at a time, each well inside a per-read timeout: only a deadline for the
        # whole request ends this
        for byte in trickled:
            if select.select([s], [], [], 0.1)[0]:  # the server answered
                break
            s.send(bytes([byte]))
            if time.monotonic() - start > 1:
                assert request(port, "GET", "/v1/health")[0] == 200
        status, body = read_answer(s)
    assert status == 408 and "within 1.5 s" in one_line_error(body)
    assert time.monotonic() - start < 20  # not the 20 s the trickle would have taken
    assert_serving(port)


def check_idle_connections(port: int, count: int = 300) -> None:
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        for _ in range(3):
            status, body = request(port, "GET", "/v1/health")
            assert status == 200 and body["bundle"]["model"] == "demo-cnn"
        assert_serving(port)
    finally:
        for s in idle:
            s.close()


def check_concurrent_predictions(port: int, count: int = 200) -> None:
    x = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda _: predict_npy(port, x), range(count)))
    assert [status for status, _ in answers] == [200] * count
    assert len({tuple(body["predictions"]) for _, body in answers}) == 1


def test_300_idle_connections_do_not_stop_health(port):
    check_idle_connections(port)


def test_200_concurrent_predictions_are_all_answered(port):
    check_concurrent_predictions(port)


def test_full_queue_answers_503_at_once(device, monkeypatch):
    """With every worker busy and no queue left, a new request is refused at once."""
    monkeypatch.setattr(serve, "MAX_QUEUED", 1)
    monkeypatch.setattr(serve, "WORKERS", 1)
    monkeypatch.setattr(serve, "READ_DEADLINE_S", 5)
    server = make_server(device, http="127.0.0.1:0")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    addr = server.server_address[:2]
    hogs = []
    try:
        for _ in range(2):  # one holds the worker, one the queue (each sent one byte)
            s = socket.create_connection(addr, timeout=30)
            s.sendall(b"G")
            hogs.append(s)
            time.sleep(0.5)
        status, body = raw_exchange(addr, b"GET /v1/health HTTP/1.1\r\n\r\n", timeout=3)
        assert status == 503 and "busy" in one_line_error(body)
    finally:
        for s in hogs:
            s.close()
        server.shutdown()
        server.server_close()


# -- HTTP: hostile bodies --------------------------------------------------------------------
@pytest.mark.parametrize("body, words", [
    (b"{not json", "not JSON"),
    (b'{"inputs": [NaN]}', "NaN is not a number JSON allows"),
    (b'{"inputs": [-Infinity]}', "-Infinity is not a number JSON allows"),
    (b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested deeper than 32"),
    (b'{"inputs": "' + b"]" * 1000 + b'", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "nested deeper than 32"),
    (b'{"inputs": [1e999]}', "NaN or infinite"),
    (b'{"inputs": [1e39]}', "beyond float32's range"),
    (b'{"inputs": {"a": 1}}', "numbers"),
    (b'{"other": 1}', '{"inputs": [...]}'),
    (b"[1, 2, 3]", '{"inputs": [...]}'),
    (b'{"inputs": [' + b"1" * 5000 + b"]}", "not JSON"),
])
def test_bad_json_bodies_are_400(port, body, words):
    status, answer = request(port, "POST", "/v1/predict", body,
                             {"Content-Type": "application/json"})
    assert status == 400 and words in one_line_error(answer)


def test_pickled_npy_is_refused_and_never_unpickled(port, tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    arr = np.empty(1, dtype=object)
    arr[0] = Payload()
    status, body = request(port, "POST", "/v1/predict", npy(arr, allow_pickle=True),
                           {"Content-Type": "application/x-npy"})
    assert status == 400 and "dtype object" in one_line_error(body)
    raw = pickle.dumps(Payload())  # a bare pickle sent as .npy
    status, body = request(port, "POST", "/v1/predict", raw,
                           {"Content-Type": "application/x-npy"})
    assert status == 400 and "not a .npy array" in one_line_error(body)
    assert not sentinel.exists()


def test_npy_header_declaring_more_than_it_holds_is_refused(port):
    small = npy(np.zeros((1, *SHAPE), np.float32))
    forged = small.replace(b"(1, 1, 32, 32)", b"(8, 1, 32, 32)")
    status, body = request(port, "POST", "/v1/predict", forged,
                           {"Content-Type": "application/x-npy"})
    assert status == 400 and "declares shape (8, 1, 32, 32)" in one_line_error(body)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (99999999, *SHAPE)})
    huge = buf.getvalue() + b"\0" * 4096
    status, body = request(port, "POST", "/v1/predict", huge,
                           {"Content-Type": "application/x-npy"})
    assert status == 400 and f"at most {MAX_BODY} bytes" in one_line_error(body)


@pytest.mark.parametrize("x, words", [
    (np.zeros((2, 3), np.float32), "does not fit this model: it takes (1, 32, 32)"),
    (np.zeros((0, *SHAPE), np.float32), "a batch of 0 samples"),
    (np.zeros((MAX_BATCH + 1, *SHAPE), np.float32), f"send 1 to {MAX_BATCH}"),
    (np.full((1, *SHAPE), np.nan, np.float32), "NaN or infinite"),
    (np.full((1, *SHAPE), np.inf, np.float64), "NaN or infinite"),
    (np.full((1, *SHAPE), 1e300, np.float64), "beyond float32's range"),
    (np.zeros((1, *SHAPE), "<U3"), "plain numbers"),
])
def test_wrong_inputs_are_400_with_one_line(port, x, words):
    status, body = predict_npy(port, x)
    assert status == 400 and words in one_line_error(body)


def test_unknown_paths_and_wrong_methods(port):
    status, body = request(port, "GET", "/v1/" + "a" * 10000)
    assert status == 404 and "no such endpoint" in one_line_error(body)
    for method, path, allowed in [("GET", "/v1/predict", "POST"), ("DELETE", "/v1/health", "GET"),
                                  ("BREW", "/v1/predict", "POST")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
        assert resp.status == 405 and resp.getheader("Allow") == allowed
        assert f"use {allowed}" in one_line_error(answer)
    assert_serving(port)


# -- Unix socket -----------------------------------------------------------------------------
def test_socket_path_holding_a_regular_file_is_refused_and_kept(device, tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="precious.txt exists and is not a socket"):
        make_server(device, socket_path=path)
    link = tmp_path / "link.sock"
    link.symlink_to(path)
    with pytest.raises(ValueError, match="is not a socket"):
        make_server(device, socket_path=link)
    assert path.read_text() == "keep me" and link.is_symlink()


def test_socket_only_stale_ones_replaced_and_only_ours_removed(device, tmp_path):
    path = tmp_path / "rt.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    server = make_server(device, socket_path=path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ValueError, match="another server is listening"):
            make_server(device, socket_path=path)
        status, body = raw_exchange(str(path), b"GET /v1/health HTTP/1.1\r\n\r\n")
        assert status == 200 and body["status"] == "ok"
    finally:
        server.shutdown()
        server.server_close()
    assert not path.exists()  # ours: removed on close
    server = make_server(device, socket_path=path)
    path.unlink()
    path.write_text("someone else's")  # replaced while we served: not ours to remove
    server.server_close()
    assert path.read_text() == "someone else's"


def test_cli_serve_refuses_a_regular_file_as_socket_and_removes_its_own(bundle, tmp_path):
    path = tmp_path / "data.db"
    path.write_bytes(b"important")
    proc = Proc([EDGE_RUNTIME, "serve", bundle, "--socket", path, "--device-id", "spk-1",
                 "--spool", tmp_path / "spool"])
    assert proc.wait(120) == 2
    close_pipes(proc)
    err = "".join(proc.err)
    assert str(path) in err and "not a socket" in err and "Traceback" not in err
    assert not (tmp_path / "spool").exists()  # refused before the device started
    assert path.read_bytes() == b"important"
    ours = tmp_path / "rt.sock"
    proc = Proc([EDGE_RUNTIME, "serve", bundle, "--socket", ours, "--device-id", "spk-1",
                 "--spool", tmp_path / "spool"])
    try:
        proc.wait_for("serving ", timeout=120)
        assert raw_exchange(str(ours), b"GET /v1/health HTTP/1.1\r\n\r\n")[0] == 200
    finally:
        assert proc.stop() == 0, proc.text()
        close_pipes(proc)
    assert not ours.exists() and path.read_bytes() == b"important"


@pytest.mark.parametrize("where, words", [
    (["--http", "localhost"], "must be HOST:PORT"),
    (["--http", "127.0.0.1:70000"], "a port from 0 to 65535"),
    (["--http", "x:" + "9" * 3000], "must be HOST:PORT"),
    (["--socket", "/nonexistent-folder/rt.sock"], "/nonexistent-folder is not a folder"),
])
def test_cli_serve_refuses_bad_addresses_before_loading(runtime_venv, tmp_path, where, words):
    not_a_bundle = tmp_path / "m.edgepack"
    not_a_bundle.write_bytes(b"never read")
    proc = run_cmd(EDGE_RUNTIME, "serve", not_a_bundle, *where, "--device-id", "spk-1",
                   "--spool", tmp_path / "spool", timeout=60)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr) < 1000 and not (tmp_path / "spool").exists()


def test_serve_under_an_address_space_limit_survives_big_bodies_idle_and_busy_clients(
        bundle, tmp_path):
    """512 MiB of address space (glibc's per-thread malloc arenas held to 2, as a small
    device would run it) stands in for a 512 MB device; a 4 GiB body is refused with 413
    without being read, and the server keeps serving."""
    limit = 512 * 1024 * 1024
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    proc = Proc(["prlimit", f"--as={limit}", EDGE_RUNTIME, "serve", bundle, "--http",
                 "127.0.0.1:0", "--device-id", "spk-small", "--spool", tmp_path / "spool"],
                env=env)
    try:
        proc.wait_for("serving ", timeout=120)
        line = next(line for line in proc.err if "serving " in line)
        port = int(line.rsplit(":", 1)[1])
        head = b"POST /v1/predict HTTP/1.1\r\nContent-Type: application/x-npy\r\n"
        status, body = raw_exchange(("127.0.0.1", port), head + b"Content-Length: %d\r\n\r\n"
                                    % (8 * limit) + b"\0" * (2 << 20))
        assert status == 413 and "16 MiB" in one_line_error(body)
        assert_serving(port)
        # the same limit holds with 300 idle connections open and 200 requests at once
        check_idle_connections(port)
        check_concurrent_predictions(port)
        assert proc.p.poll() is None
    finally:
        assert proc.stop() == 0, proc.text()
        close_pipes(proc)


# -- remote commands -------------------------------------------------------------------------
def parse_only(cmd: dict) -> dict:
    """The device's own argument checks, without running the command."""
    return command_args(cmd["command"], cmd["args"])


def bounded(result: dict) -> dict:
    assert set(result) >= {"id", "command", "ok"}
    assert len(json.dumps(result)) < 2000
    if not result["ok"]:
        assert "\n" not in result["error"] and "Traceback" not in result["error"]
    return result


def test_command_with_a_20_mib_name_is_refused_without_echoing_it():
    raw = json.dumps({"id": 1, "command": "x" * (20 << 20)}).encode()
    result = bounded(handle_command(raw, parse_only))
    assert not result["ok"] and f"at most {MAX_COMMAND_BYTES}" in result["error"]
    name = "y" * 1000  # under the byte cap, over the name cap: echoed truncated
    result = bounded(handle_command(json.dumps({"command": name}).encode(), parse_only))
    assert not result["ok"] and "(1000 chars)" in result["command"]
    assert "at most 64" in result["error"]


@pytest.mark.parametrize("raw, words", [
    (b'{"command": "ping", "args": ' + b"[" * 10000 + b"]" * 10000 + b"}", "nested deeper"),
    (b'{"command": "ping", "args": {"a": NaN}}', "NaN"),
    (b"\xff\xfe garbage", "not JSON"),
    (b'["ping"]', "expected {"),
    (b'{"command": 5}', "expected {"),
    (b'{"command": "ping", "args": [1]}', "args must be an object"),
    (b'{"command": "ping", "id": {"x": 1}}', "id must be a string"),
    (b'{"command": "ping", "id": "' + b"i" * 100 + b'"}', "id must be a string"),
    (b'{"command": "ping", "args": {"extra": 1}}', "takes no argument(s) 'extra'"),
    (b'{"command": "selfdestruct"}', "this runtime knows ping, bench, reload"),
    (b'{"command": "reload", "args": {"bundle": 5}}', "reload needs args.bundle"),
])
def test_malformed_commands_give_bounded_error_results(raw, words):
    result = bounded(handle_command(raw, parse_only))
    assert result["ok"] is False and words in result["error"], result


@pytest.mark.parametrize("args", [
    {"runs": "10"}, {"runs": 1e12}, {"runs": 10**12}, {"runs": True}, {"runs": 0},
    {"warmup": -1}, {"warmup": 2.5}, {"runs": None}, {"warmup": [1]},
])
def test_bench_args_must_be_bounded_integers(args):
    with pytest.raises(CommandError, match=r"an integer from \d+ to \d+"):
        command_args("bench", args)
    raw = json.dumps({"id": "b1", "command": "bench", "args": args}).encode()
    result = bounded(handle_command(raw, parse_only))
    assert result["ok"] is False and result["id"] == "b1"
    assert command_args("bench", {"runs": 5}) == {"runs": 5, "warmup": 20}


def test_device_commands_refuse_bad_args_before_doing_anything(device):
    raw = json.dumps({"id": 7, "command": "bench", "args": {"runs": "1e12"}}).encode()
    result = bounded(handle_command(raw, device.handle_command))
    assert result == {"id": 7, "command": "bench", "ok": False,
                      "error": "bench takes args.runs: an integer from 1 to 100000"}
    result = bounded(handle_command(b'{"id": 8, "command": "ping"}', device.handle_command))
    assert result["ok"] and result["result"]["pong"] is True


# -- fuzzing ---------------------------------------------------------------------------------
def check_decoder(raw: bytes, content_type: str) -> None:
    try:
        x = parse_inputs(raw, content_type)
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
    else:
        assert isinstance(x, np.ndarray) and x.dtype == np.float32


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.sampled_from(["application/json", "application/x-npy"]))
def test_fuzz_body_decoder_raises_only_one_line_value_errors(raw, content_type):
    check_decoder(raw, content_type)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_npy_headers(tail):
    # a real .npy magic and version, then anything: the header parser is what is attacked
    check_decoder(npy(np.zeros((1, 2), np.float32))[:8] + tail, "application/x-npy")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


COMMAND_PAYLOADS = st.one_of(
    st.binary(max_size=4096),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"command": st.sampled_from(["ping", "bench", "reload"]) | st.text(),
                           "id": JSON, "args": JSON}).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=200, deadline=None)
@given(COMMAND_PAYLOADS)
def test_fuzz_handle_command_never_raises_and_stays_bounded(raw):
    for handler in (None, parse_only):
        bounded(handle_command(raw, handler))
