"""Ground-truth feedback on a real bundle: inference ids, Device.feedback and its refusals,
the window's "feedback" section (read back from the spool), POST /v1/feedback over real
HTTP, and `edge-runtime replay --feedback-share` in the torch-free environment."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.device import Device
from runtime.feedback import RING, FeedbackError
from runtime.serve import (
    MAX_FEEDBACK_BODY,
    MAX_FEEDBACK_ITEMS,
    InputError,
    make_server,
    parse_feedback,
)
from runtime.spool import Spool
from tests.conftest import run_cmd
from tests.fleet_helpers import EDGE_RUNTIME


@pytest.fixture(scope="module")
def bundle(build_demo) -> Path:
    return build_demo("smart-speaker").bundle


def spooled(folder: Path) -> list[tuple[str, bytes, dict]]:
    """Every message the device spooled, in order (nothing was sent: no broker), as
    (topic, payload, parsed message)."""
    spool = Spool(folder)
    try:
        return [(r.topic, r.payload, json.loads(r.payload))
                for r in spool.pending(limit=100_000)]
    finally:
        spool.close()


def windows(folder: Path) -> list[dict]:
    return [m["body"] for _, _, m in spooled(folder) if m["kind"] == "window"]


def test_ids_and_window_accuracy(bundle, digits, tmp_path):
    x, y = digits
    with Device.open(bundle, device_id="fb-1", spool_dir=tmp_path / "spool",
                     window_inferences=100_000) as dev:
        assert re.fullmatch(r"[0-9a-f]{8}", dev.session)
        ids, conf = dev.classify(x[:1])  # without ids: the same two arrays as before
        logits, first = dev.predict(x[1:3], with_ids=True)
        assert first == [f"{dev.session}-2", f"{dev.session}-3"]
        ids, conf, inference_ids = dev.classify(x[3:60], with_ids=True)
        assert inference_ids == [f"{dev.session}-{n}" for n in range(4, 61)]
        heard: list[tuple[int, int]] = []
        dev.feedback_listeners.append(lambda n, label: heard.append((n, label)))
        # 40 true labels (the model is right on most), 5 deliberately wrong ones
        correct = 0
        for i in range(40):
            result = dev.feedback(inference_ids[i], int(y[3 + i]))
            assert result["prediction"] == ids[i] and result["label"] == y[3 + i]
            correct += result["correct"]
        for i in range(40, 45):
            wrong = (int(ids[i]) + 1) % 10
            assert dev.feedback(inference_ids[i], str(wrong))["correct"] is False
        assert heard[0] == (4, int(y[3])) and len(heard) == 45
        dev.telemetry.flush()
        dev.classify(x[:5])  # a window without feedback has no section
    assert dev.feedback_stats == {"accepted": 45, "correct": correct, "refused": 0}
    first_window, second = windows(tmp_path / "spool")
    assert first_window["feedback"] == {"count": 45, "correct": correct,
                                        "accuracy": round(correct / 45, 6)}
    assert correct >= 35
    assert "feedback" not in second


def _new_sha_copy(bundle: Path, dest: Path) -> Path:
    """The same bundle, repacked with other member times: another sha256, the same model."""
    with tarfile.open(bundle, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.mtime += 1
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return dest


def test_refusals_are_one_line_feedback_errors(bundle, digits, tmp_path):
    x, _ = digits
    with Device.open(bundle, device_id="fb-2", spool_dir=tmp_path / "spool") as dev:
        ids, _, inference_ids = dev.classify(x[:4], with_ids=True)
        s = dev.session
        other = "0" * 8 if s != "0" * 8 else "1" * 8
        dev.feedback(inference_ids[0], 3)
        cases = [
            (inference_ids[0], 3, "already has a label"),
            (f"{other}-1", 1, "not from this device process"),
            (f"{s}-5", 1, "no inference"),
            (f"{s}-0", 1, "is not an inference id"),
            ("x" * 10_000, 1, "is not an inference id"),
            (7, 1, "must be a string"),
            (None, 1, "must be a string"),
            (inference_ids[1], 10, "not a class index of this model (0..9)"),
            (inference_ids[1], -1, "not a class index"),
            (inference_ids[1], 10**400, "not a class index"),
            (inference_ids[1], "cat", "not a label name"),
            (inference_ids[1], True, "must be a class index"),
            (inference_ids[1], 2.0, "must be a class index"),
            (inference_ids[1], [1], "must be a class index"),
            (inference_ids[1], "9" * 5000, "not a label name"),
        ]
        for inference_id, label, words in cases:
            with pytest.raises(FeedbackError, match=re.escape(words)) as err:
                dev.feedback(inference_id, label)
            assert isinstance(err.value, ValueError)
            assert "\n" not in str(err.value) and len(str(err.value)) < 300
        assert dev.feedback_stats["refused"] == len(cases)
        assert dev.feedback(inference_ids[1], "7")["label"] == 7  # the name "7"

        # the ring: the batch that runs past its end keeps its ids right; the oldest go
        batch = np.repeat(x[:64], 64, axis=0)  # 4096 rows: 16 of them fill the ring
        for _ in range(16):  # n = 5 .. RING + 4; the last batch wraps at n = RING
            last_ids, _, last_names = dev.classify(batch, with_ids=True)
        assert last_names[4091] == f"{s}-{RING}"
        for i in (0, 4090, 4091, 4095):  # both sides of the wrap
            assert dev.feedback(last_names[i], 0)["prediction"] == last_ids[i], i
        assert dev.feedback(f"{s}-5", 0)["prediction"] == last_ids[0]  # the oldest held
        with pytest.raises(FeedbackError, match="too old"):
            dev.feedback(inference_ids[3], 1)

        # a reload: what the old bundle served is refused, saying so; new ids count
        before = dev.classify(x[:1], with_ids=True)[2][0]
        dev.reload(str(_new_sha_copy(bundle, tmp_path / "copy.edgepack")))
        with pytest.raises(FeedbackError, match="since replaced by .*not counted"):
            dev.feedback(before, 1)
        after = dev.classify(x[:1], with_ids=True)[2][0]
        assert dev.feedback(after, 1)["inference_id"] == after


def test_a_failing_listener_does_not_fail_the_feedback(bundle, digits, tmp_path):
    x, y = digits
    with Device.open(bundle) as dev:  # no telemetry: ids and feedback work all the same
        dev.feedback_listeners.append(lambda n, label: 1 / 0)
        _, names = dev.predict(x[:2], with_ids=True)
        assert dev.feedback(names[0], int(y[0]))["inference_id"] == names[0]


# -- serve: POST /v1/feedback -------------------------------------------------------------------
def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if path != "/metrics" else data.decode())
    finally:
        conn.close()


def post(port: int, path: str, doc) -> tuple[int, dict]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return request(port, "POST", path, body, {"Content-Type": "application/json"})


def one_line(body: dict) -> str:
    assert set(body) == {"error"}, body
    assert "\n" not in body["error"] and len(body["error"]) < 600
    return body["error"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2048),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.sampled_from(
                                  ["feedback", "inference_id", "label", "x"]), inner,
                                  max_size=3), max_leaves=30)
                 .map(lambda doc: json.dumps(doc).encode())))
def test_fuzz_feedback_bodies_give_items_or_one_line_errors(raw):
    try:
        items = parse_feedback(raw)
    except InputError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
    else:
        assert isinstance(items, list) and 1 <= len(items) <= MAX_FEEDBACK_ITEMS


def test_serve_feedback_endpoint(bundle, digits, tmp_path):
    x, y = digits
    dev = Device.open(bundle, device_id="fb-srv", spool_dir=tmp_path / "spool")
    server = make_server(dev, http="127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        status, answer = post(port, "/v1/predict", {"inputs": x[:6].tolist()})
        assert status == 200 and len(answer["inference_ids"]) == 6
        names, preds = answer["inference_ids"], answer["predictions"]

        status, got = post(port, "/v1/feedback", {"inference_id": names[0], "label": int(y[0])})
        first_correct = int(preds[0] == y[0])
        assert status == 200 and got == {"accepted": 1, "correct": first_correct,
                                         "refused": []}
        items = [{"inference_id": names[1], "label": str(preds[1])},
                 {"inference_id": names[0], "label": 1},  # a second label
                 {"inference_id": names[2], "label": 99},
                 {"inference_id": names[3]},
                 "not an object",
                 {"inference_id": names[4], "label": int(preds[4])}]
        status, got = post(port, "/v1/feedback", {"feedback": items})
        assert status == 200 and got["accepted"] == 2 and got["correct"] == 2, got
        assert [r["index"] for r in got["refused"]] == [1, 2, 3, 4]
        assert "already has a label" in got["refused"][0]["error"]
        assert "not a class index" in got["refused"][1]["error"]

        bad = [
            (b"{not json", 400, "not JSON"),
            (b"[1, 2]", 400, "body must be JSON"),
            (b'{"inference_id": "a"}', 400, "body must be JSON"),
            (b'{"feedback": {"a": 1}}', 400, "body must be JSON"),
            (b'{"feedback": []}', 400, f"send 1 to {MAX_FEEDBACK_ITEMS}"),
            (json.dumps({"feedback": [{"inference_id": names[5], "label": 1}]
                         * (MAX_FEEDBACK_ITEMS + 1)}).encode(), 400, "send 1 to"),
            (b'{"feedback": [[[[[[1]]]]]]}', 400, "nested deeper"),
            (b'{"inference_id": "a", "label": NaN}', 400, "not a number JSON allows"),
            (b" " * (MAX_FEEDBACK_BODY + 1), 413, "larger than the limit"),
        ]
        for body, code, words in bad:
            status, answer = post(port, "/v1/feedback", body)
            assert status == code and words in one_line(answer), (body[:60], answer)
        status, answer = request(port, "POST", "/v1/feedback", b"",
                                 {"Content-Type": "application/json"})
        assert status == 400 and "empty body" in one_line(answer)
        status, answer = request(port, "GET", "/v1/feedback")
        assert status == 405 and "use POST" in one_line(answer)

        status, text = request(port, "GET", "/metrics")
        assert f'edgepack_feedback_total{{result="correct"}} {2 + first_correct}' in text
        # the device's count: items not shaped like feedback never reached it
        assert 'edgepack_feedback_total{result="refused"} 2' in text
        assert 'edgepack_requests_total{path="/v1/feedback",code="200"} 2' in text
    finally:
        server.shutdown()
        server.server_close()
        dev.close(0)
    assert windows(tmp_path / "spool")[-1]["feedback"]["count"] == 3


def test_replay_feedback_share_without_torch(bundle, digits_test_npz, runtime_venv, tmp_path):
    proc = run_cmd(EDGE_RUNTIME, "replay", bundle, "--inputs", digits_test_npz,
                   "--device-id", "fb-replay", "--spool", tmp_path / "spool", "--json",
                   "--feedback-share", "0.25", "--window-inferences", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    n = summary["inferences"]
    assert summary["feedback"]["accepted"] == n // 4 and summary["feedback"]["refused"] == 0
    sections = [w["feedback"] for w in windows(tmp_path / "spool") if "feedback" in w]
    assert sum(s["count"] for s in sections) == n // 4
    assert sum(s["correct"] for s in sections) == summary["feedback"]["correct"]
    assert summary["feedback"]["correct"] / summary["feedback"]["accepted"] > 0.8

    plain = tmp_path / "x.npy"
    with np.load(digits_test_npz) as d:
        np.save(plain, d["x"][:10])
    refused = run_cmd(EDGE_RUNTIME, "replay", bundle, "--inputs", plain, "--device-id", "r",
                      "--spool", tmp_path / "spool2", "--feedback-share", "0.5")
    assert refused.returncode == 2 and "needs labels" in refused.stderr
