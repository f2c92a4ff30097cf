"""`GET /metrics` on `edge-runtime serve`: the endpoint's counters in the Prometheus text
exposition format (version 0.0.4), written here in a few lines so that the device needs no
client library. Every label value comes from a fixed set or from the bundle (model, version,
backend, sha256 prefix), never from a request, so a client cannot grow the output."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from runtime.window import process_cpu_s, process_rss_mb

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# upper bounds (seconds) of the latency histogram's buckets, one inference call each
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# what an error answer counts as, by status: a fixed set of label values
ERROR_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               408: "timeout", 411: "length_required", 413: "too_large",
               500: "inference_failed", 503: "busy"}
SHA_PREFIX = 12


def escape_label(value: str) -> str:
    """A label value as the format wants it: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items()) + "}"


def _value(v: float) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class ServeMetrics:
    """Counters the serving endpoint updates; `render` writes them out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_wall = time.time()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.inferences = 0  # samples
        self.calls = 0  # classify calls (requests that reached the model)
        self.latency_sum = 0.0
        self.bucket_counts = [0] * len(BUCKETS)  # per bucket, not yet cumulative

    def answered(self, path: str, code: int) -> None:
        """One answer sent; `path` must already be one of the endpoint's own or "other"."""
        with self._lock:
            self.requests[(path, code)] = self.requests.get((path, code), 0) + 1
            if code >= 400:
                kind = ERROR_KINDS.get(code, f"http_{code // 100}xx")
                self.errors[kind] = self.errors.get(kind, 0) + 1

    def inferred(self, samples: int, seconds: float) -> None:
        with self._lock:
            self.inferences += samples
            self.calls += 1
            self.latency_sum += seconds
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.bucket_counts[i] += 1
                    break

    def render(self, device: Any) -> str:
        """The exposition text: this endpoint, the model, the spool, the process."""
        with self._lock:
            requests, errors = dict(self.requests), dict(self.errors)
            inferences, calls, total = self.inferences, self.calls, self.latency_sum
            buckets = list(self.bucket_counts)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str,
                   samples: list[tuple[str, dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{suffix}{_labels(labels)} {_value(v)}"
                       for suffix, labels, v in samples)

        info = device.info
        family("edgepack_model_info", "gauge", "The bundle being served (value 1).",
               [("", {"model": str(info.get("model")), "version": str(info.get("version")),
                      "backend": str(info.get("backend")),
                      "profile": str(info.get("profile")),
                      "sha256": str(info.get("sha256"))[:SHA_PREFIX]}, 1)])
        family("edgepack_inferences_total", "counter", "Samples classified.",
               [("", {}, inferences)])
        family("edgepack_requests_total", "counter", "HTTP answers by path and status.",
               [("", {"path": p, "code": str(c)}, n) for (p, c), n in sorted(requests.items())])
        family("edgepack_errors_total", "counter", "Error answers by kind.",
               [("", {"kind": k}, n) for k, n in sorted(errors.items())])
        cumulative, hist = 0, []
        for bound, n in zip(BUCKETS, buckets, strict=True):
            cumulative += n
            hist.append(("_bucket", {"le": _value(bound)}, cumulative))
        hist += [("_bucket", {"le": "+Inf"}, calls), ("_sum", {}, total), ("_count", {}, calls)]
        family("edgepack_inference_seconds", "histogram",
               "Time of one classify call (a request's batch of samples).", hist)
        fb = getattr(device, "feedback_stats", None)
        if fb is not None:
            family("edgepack_feedback_total", "counter",
                   "Feedback labels: correct or incorrect (against the served prediction), "
                   "or refused.",
                   [("", {"result": "correct"}, fb["correct"]),
                    ("", {"result": "incorrect"}, fb["accepted"] - fb["correct"]),
                    ("", {"result": "refused"}, fb["refused"])])
        tel = getattr(device, "telemetry", None)
        if tel is not None:
            st = tel.spool.stats()
            connected = bool(tel.conn and tel.conn.connected.is_set())
            family("edgepack_spool_pending_records", "gauge",
                   "Telemetry records waiting for the broker.", [("", {}, st["pending"])])
            family("edgepack_spool_bytes", "gauge", "Bytes the spool holds on disk.",
                   [("", {}, st["bytes"])])
            family("edgepack_spool_dropped_total", "counter",
                   "Records dropped because the spool was full.", [("", {}, st["dropped"])])
            family("edgepack_spool_lost_total", "counter",
                   "Records the disk refused (never written).", [("", {}, st["lost"])])
            family("edgepack_spool_corrupt_total", "counter",
                   "Records found corrupt on reading the spool.", [("", {}, st["corrupt"])])
            family("edgepack_telemetry_connected", "gauge",
                   "1 while connected to the broker.", [("", {}, int(connected))])
        family("edgepack_uptime_seconds", "gauge", "Seconds since the device started.",
               [("", {}, round(time.monotonic() - device.started, 3))])
        family("process_start_time_seconds", "gauge", "When the endpoint started (epoch s).",
               [("", {}, round(self.started_wall, 3))])
        family("process_cpu_seconds_total", "counter", "User and system CPU time.",
               [("", {}, round(process_cpu_s(), 4))])
        rss = process_rss_mb()
        if not math.isnan(rss):
            family("process_resident_memory_bytes", "gauge", "Resident memory.",
                   [("", {}, int(rss * 2**20))])
        return "\n".join(out) + "\n"
