"""A serving device: one verified model, its telemetry, and the commands it takes.

    from runtime.device import Device
    with Device.open("model.edgepack", device_id="spk-0042", spool_dir="/var/lib/edgepack",
                     broker=BrokerConfig.from_url("mqtts://broker:8883")) as dev:
        ids, confidence = dev.classify(batch)

`Device.classify` is the same path `edge-runtime serve` and `edge-runtime replay` use:
it times the inference and feeds the telemetry window. Every inference row gets an id
(`classify(batch, with_ids=True)` returns them), and `dev.feedback(inference_id, label)`
reports the true label when the application learns it (runtime.feedback); with
`capture_rate` > 0, a sample of the inputs is shipped with the telemetry (runtime.capture).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import preprocess
from runtime.bundle import BundleError, sha256_file
from runtime.capture import Capture
from runtime.feedback import MASK, RING, Ledger, new_session
from runtime.model import Model, load
from runtime.mqtt import BrokerConfig
from runtime.shadow import ShadowRunner
from runtime.signing import TrustStore, load_trust
from runtime.telemetry import CommandError, Telemetry, TelemetryOptions
from runtime.window import MIN_DRIFT_SAMPLES, Window
from targets.base import BackendUnavailable

FETCH_TIMEOUT_S = 10       # one read from the server
FETCH_DEADLINE_S = 120     # the whole download: a server dribbling bytes does not hold us
FETCH_MAX_BYTES = 512 * 1024 * 1024
EXTRACTED = "extracted"    # under the spool folder: one folder per loaded bundle
RELOADED = "bundles"       # under the spool folder: the reloaded bundle and the one before
MODES = ("serve", "shadow")  # what a reload does with the bundle it fetched

log = logging.getLogger("edgepack.device")
_clock, _softmax = time.perf_counter, preprocess.softmax  # looked up once, not per inference


def bundle_info(path: Path, model: Model) -> dict[str, Any]:
    m = model.manifest
    return {"sha256": sha256_file(path), "model": m.model.name,
            "version": m.model.version, "profile": m.target.profile,
            "backend": m.target.backend, "precision": m.target.precision}


def dry_window(model: Model, reference: dict[str, Any] | None) -> None:
    """One telemetry window over the golden inputs and outputs, repeated up to the drift
    minimum: a reference the window code cannot use fails here, not in the serving path."""
    inputs, outputs = model.golden
    if not len(inputs):
        return
    reps = -(-MIN_DRIFT_SAMPLES // len(inputs))
    x = np.concatenate([inputs] * reps)
    probs = preprocess.softmax(np.concatenate([outputs] * reps))
    window = Window(reference, len(model.labels), view=model.drift_view)
    try:
        window.record(x, probs.argmax(-1), probs.max(-1), 0.001)
        window.close()
    except Exception as exc:  # whatever the reference's shape makes the window code raise
        raise BundleError(f"reference distributions do not fit the telemetry window: "
                          f"{type(exc).__name__}: {exc}") from exc


class Device:
    def __init__(self, bundle: Path, model: Model, *, trust: TrustStore | None,
                 threads: int | None, telemetry: TelemetryOptions | None,
                 base_sha256: str | None = None, workdir: Path | None = None,
                 previous: dict[str, str] | None = None) -> None:
        self.bundle_path = Path(bundle)
        self.model = model
        self.workdir = workdir  # the model's extraction folder when the device made it
        self.trust = trust  # read once at start-up: a reload checks against the same keys
        self.threads = threads
        self._model_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.started = time.monotonic()
        self.telemetry: Telemetry | None = None
        self.info = bundle_info(self.bundle_path, model)
        # the bundle the device was started with (not the same when a reload is resumed)
        self.base_sha256 = base_sha256 or self.info["sha256"]
        # inference ids "<session>-<n>": n counts this process's inference rows from 1
        self.session = new_session()
        self._next_n = 1
        self._ledger = Ledger(self.session, lambda: self._next_n, self.info)
        self._served = self._ledger.served  # the serving path's ring of predictions
        # called with (n, label index) after each accepted feedback (shadow runs register)
        self.feedback_listeners: list[Callable[[int, int], None]] = []
        self.capture: Capture | None = None
        # the bundle served before the last serve-mode reload (what `rollback` installs)
        self.previous: dict[str, str] | None = previous
        self._shadow: ShadowRunner | None = None  # a candidate running beside the served model
        self._shadow_workdir: Path | None = None
        if telemetry is not None:
            self.telemetry = Telemetry(telemetry, self.info, model.reference,
                                       len(model.labels),
                                       model.manifest.target.budgets,
                                       on_command=self.handle_command,
                                       view=model.drift_view)
            self.telemetry.add_section("feedback", self._ledger.section)
            if telemetry.capture_rate > 0:
                self.capture = Capture(self.telemetry, self.session, telemetry.capture_rate,
                                       int(telemetry.capture_max_mb * 2**20))
                self.telemetry.add_section("capture", self.capture.section)

    @classmethod
    def open(cls, bundle: Path | str, *, device_id: str | None = None,
             spool_dir: Path | str | None = None, broker: BrokerConfig | None = None,
             trust: TrustStore | Path | str | None = None, threads: int | None = None,
             **telemetry_options: Any) -> Device:
        """Verify and load the bundle (self-test included); with a device id and a spool
        folder, start telemetry too (with a broker, also send it). `telemetry_options` are
        TelemetryOptions fields: window_seconds, fsync, ..., `ack` ("listener", the default:
        a record leaves the spool when a listener has stored it; "broker": when the broker
        has it), `ack_timeout_s`, and `capture_rate` (0..1, default 0: nothing captured) and
        `capture_max_mb` (default 16) for data capture. If a `reload` command
        replaced this very bundle in an earlier run with the same spool folder, the reloaded
        bundle serves again (a command line naming another bundle wins)."""
        given = Path(bundle)
        if trust is not None and not isinstance(trust, TrustStore):
            trust = load_trust(trust)
        spool = Path(spool_dir) if spool_dir else None
        if spool is not None:
            clean_stale_extractions(spool)
        if device_id is None and telemetry_options.get("capture_rate"):
            raise ValueError("capture needs telemetry: a device id and a spool folder")
        bundle, base_sha256 = resume_reloaded(given, spool)
        previous = None
        if base_sha256 is not None:
            try:  # the reloaded bundle must still load, self-test and serve; else the given
                model, workdir = _load_checked(bundle, trust, threads, spool)
            except (BundleError, BackendUnavailable, OSError, ValueError) as exc:
                log.warning("the reloaded bundle %s does not load (%s); serving %s instead",
                            bundle, exc, given)
                bundle, base_sha256 = given, None
            else:
                previous = _previous_of(_read_reload_state(spool / RELOAD_STATE))
        if base_sha256 is None:
            model, workdir = _load(bundle, trust, threads, spool)
        try:
            result = model.self_test()
            dry_window(model, model.reference)
            opts = None
            if device_id is not None:
                if spool_dir is None:
                    raise ValueError("telemetry needs a spool folder (spool_dir)")
                opts = TelemetryOptions(device_id=device_id, spool_dir=Path(spool_dir),
                                        broker=broker, **telemetry_options)
            dev = cls(Path(bundle), model, trust=trust, threads=threads, telemetry=opts,
                      base_sha256=base_sha256, workdir=workdir, previous=previous)
        except BaseException:
            _close_model(model, workdir)
            raise
        if not result.ok:
            if dev.telemetry:
                dev.telemetry.event("self_test", ok=False, message=result.message)
                dev.telemetry.close(drain_timeout=0)
            _close_model(model, workdir)
            raise BundleError(result.message)
        if dev.telemetry:
            dev.telemetry.start()
            dev.telemetry.event("model_loaded", bundle=dev.info, path=str(bundle))
            dev.telemetry.event("self_test", ok=True, message=result.message)
        return dev

    # -- inference --------------------------------------------------------------------------
    # classify and predict are two copies of one path on purpose: after an inference the
    # interpreter's caches are cold, and a call layer more costs a few tenths of a
    # microsecond, a tenth of what telemetry may add. What ids and feedback add per call: the
    # counter's add (under the model lock, where a reload swaps the model) and one store of
    # the predictions into the feedback ring.
    def classify(self, x: np.ndarray, *, with_ids: bool = False) -> tuple[Any, ...]:
        """Raw input (one sample or a batch) -> (class ids, confidence), and with
        `with_ids` the rows' inference ids (a list of str) third."""
        telemetry, lock, capture = self.telemetry, self._model_lock, self.capture
        t0 = _clock()
        lock.acquire()  # (acquire and release: cheaper than `with` on this path)
        try:
            model = self.model  # a reload swaps it under this lock
            batch = model.batch(x)
            logits = model.run(batch)
            n = self._next_n
            self._next_n = n + len(logits)
        except Exception as exc:
            self._failed(exc)
            raise
        finally:
            lock.release()
        elapsed = _clock() - t0
        probs = _softmax(logits)
        ids, conf = probs.argmax(-1), probs.max(-1)
        slot = n & MASK
        if slot + len(ids) <= RING:
            self._served[slot:slot + len(ids)] = ids
        else:
            self._store_wrapped(slot, ids)
        if telemetry:
            telemetry.record(batch, ids, conf, elapsed)
            if capture is not None:
                capture.take(batch, n, ids, conf)
        if (shadow := self._shadow) is not None:
            shadow.offer(batch, ids, n)  # n: the batch's first inference number
        if with_ids:
            return ids, conf, self._ledger.inference_ids(n, len(ids))
        return ids, conf

    def predict(self, x: np.ndarray, *, with_ids: bool = False) -> Any:
        """Raw input -> the model's outputs (logits), and with `with_ids` (outputs,
        inference ids)."""
        telemetry, lock, capture = self.telemetry, self._model_lock, self.capture
        t0 = _clock()
        lock.acquire()
        try:
            model = self.model
            batch = model.batch(x)
            logits = model.run(batch)
            n = self._next_n
            self._next_n = n + len(logits)
        except Exception as exc:
            self._failed(exc)
            raise
        finally:
            lock.release()
        elapsed = _clock() - t0
        if telemetry:
            probs = _softmax(logits)
            ids, conf = probs.argmax(-1), probs.max(-1)
            telemetry.record(batch, ids, conf, elapsed)
            if capture is not None:
                capture.take(batch, n, ids, conf)
        else:
            ids = logits.argmax(-1)
        slot = n & MASK
        if slot + len(ids) <= RING:
            self._served[slot:slot + len(ids)] = ids
        else:
            self._store_wrapped(slot, ids)
        if (shadow := self._shadow) is not None:
            shadow.offer(batch, logits, n)  # the runner takes the argmax of its samples
        if with_ids:
            return logits, self._ledger.inference_ids(n, len(ids))
        return logits

    def _store_wrapped(self, slot: int, ids: np.ndarray) -> None:
        """A batch that runs past the ring's end (of a longer batch than the ring, the last
        RING rows are remembered)."""
        if len(ids) > RING:
            slot, ids = (slot + len(ids) - RING) & MASK, ids[-RING:]
        head = min(RING - slot, len(ids))
        self._served[slot:slot + head] = ids[:head]
        self._served[:len(ids) - head] = ids[head:]

    # -- feedback ------------------------------------------------------------------------------
    def feedback(self, inference_id: str, label: int | str) -> dict[str, Any]:
        """The true label of an inference this process served: a class index or a label name
        of the bundle. Returns {"inference_id", "label" (index), "prediction" (served),
        "correct"}; the window's "feedback" section counts it. FeedbackError (a ValueError,
        one line) for an id that is not this session's, not served yet or too old (the last
        65536 are remembered), one served by a bundle since replaced, a label the model does
        not have, or a second label for the same inference."""
        with self._model_lock:  # the labels and the bundle of the model serving now
            labels, info = self.model.labels, self.info
        result, n, index = self._ledger.accept(inference_id, label, labels, info)
        if self.capture is not None:
            self.capture.label(n, index)
        for listener in tuple(self.feedback_listeners):
            try:
                listener(n, index)
            except Exception:  # a listener's failure is its own, not the caller's
                log.exception("a feedback listener failed")
        return result

    def _failed(self, exc: Exception) -> None:
        if self.telemetry:
            self.telemetry.record_error("bad_input" if isinstance(exc, ValueError)
                                        else type(exc).__name__)

    @property
    def feedback_stats(self) -> dict[str, int]:
        """Labels this process accepted, how many matched the served prediction, and how
        many it refused."""
        return dict(self._ledger.totals)

    # -- commands -----------------------------------------------------------------------------
    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["command"]
        args = command_args(name, cmd["args"])
        if name == "ping":
            shadow = self._shadow
            return {"pong": True, "uptime_s": round(time.monotonic() - self.started, 3),
                    "bundle": self.info,
                    "shadow": shadow and {"candidate": shadow.candidate,
                                          "sample": shadow.sample,
                                          "cpu_share": shadow.cpu_share},
                    "spool": self.telemetry.spool.stats() if self.telemetry else None}
        if name == "bench":
            return self.bench(args["runs"], args["warmup"])
        if name == "shadow_stop":
            return self._exclusive(self._shadow_stop_locked)
        if name == "rollback":
            return self._exclusive(self._rollback_locked)
        if args["mode"] == "shadow":
            return self.shadow(args["bundle"], sample=args["sample"],
                               cpu_share=args["cpu_share"])
        return self.reload(args["bundle"])

    def bench(self, runs: int, warmup: int) -> dict[str, Any]:
        """`edge-runtime bench --json` on the bundle being served, in a fresh process so the
        serving process's state does not colour the figure."""
        if not 1 <= runs <= 100_000 or not 0 <= warmup <= 10_000:
            raise CommandError("bench takes 1 <= runs <= 100000 and 0 <= warmup <= 10000")
        trust_file = None
        try:
            cmd = [sys.executable, "-m", "runtime", "bench", str(self.bundle_path), "--json",
                   "--runs", str(runs), "--warmup", str(warmup)]
            if self.threads:
                cmd += ["--threads", str(self.threads)]
            if self.trust is not None:
                fd, trust_file = tempfile.mkstemp(prefix="edgepack-trust-", suffix=".toml")
                os.write(fd, self.trust.to_toml().encode())
                os.close(fd)
                cmd += ["--trust", trust_file]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        finally:
            if trust_file:
                os.unlink(trust_file)
        if proc.returncode != 0:
            raise CommandError(f"edge-runtime bench failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)

    def reload(self, source: str) -> dict[str, Any]:
        """Fetch, verify, self-test and run a new bundle, keep a copy and persist it; only
        then swap it in: health, ping, windows and the persisted state change together.
        Anything that fails leaves the old model serving (the rollback), no temporary files
        and no new state, and says why."""
        return self._exclusive(self._reload_locked, source)

    def _exclusive(self, fn: Callable[..., dict[str, Any]], *args: Any,
                   **kwargs: Any) -> dict[str, Any]:
        """Reloads, shadow runs and rollbacks one at a time; a second one is refused."""
        if not self._reload_lock.acquire(blocking=False):
            raise CommandError("a reload is already in progress")
        try:
            return fn(*args, **kwargs)
        finally:
            self._reload_lock.release()

    def _reload_locked(self, source: str, *, rollback: bool = False) -> dict[str, Any]:
        old_info = self.info
        # what a later rollback installs: the bundle serving now (a rollback leaves nothing to
        # roll back to; reloading the bundle being served changes nothing)
        previous = (None if rollback else
                    {"path": str(self.bundle_path), "sha256": old_info["sha256"]})
        spool = self.telemetry.opts.spool_dir if self.telemetry else None
        new, workdir, kept = None, None, None
        staging = _staging(spool, "reload", f"reload from {source} failed, still serving "
                                            f"{old_info['model']} {old_info['version']}")
        try:
            path = fetch_bundle(source, staging)
            new, workdir = _load_checked(path, self.trust, self.threads, spool)
            reference = new.reference
            kept = self._keep_bundle(path)
            new_info = bundle_info(kept, new)
            if new_info["sha256"] == old_info["sha256"] and not rollback:
                previous = self.previous
            self._remember_reload(kept, new_info, previous)
        except (BundleError, BackendUnavailable, OSError, ValueError) as exc:
            if new is not None:
                _close_model(new, workdir)
            if kept is not None and kept != self.bundle_path and not (
                    self.previous and str(kept) == self.previous["path"]):
                kept.unlink(missing_ok=True)
            if self.telemetry:
                self.telemetry.event("reload_failed", source=source, error=str(exc),
                                     serving=old_info)
            raise CommandError(f"reload from {source} failed, still serving "
                               f"{old_info['model']} {old_info['version']}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._model_lock:
            old_model, old_workdir, self.model = self.model, self.workdir, new
            self.bundle_path, self.info, self.workdir = kept, new_info, workdir
            self._ledger.bundle_changed(self._next_n, new_info)  # older ids: no feedback
            self.previous = previous
            if self.telemetry:  # under the model lock: no inference lands in a mixed window
                self.telemetry.set_bundle(new_info, reference, len(new.labels),
                                          new.manifest.target.budgets, new.drift_view)
        _close_model(old_model, old_workdir)
        _prune_bundles(kept.parent, keep={kept, *([Path(previous["path"])] if previous else [])})
        if self.telemetry:
            self.telemetry.event("model_loaded", bundle=new_info, path=str(kept),
                                 replaced=old_info)
        # the candidate was judged against the model just replaced: its run is over (the
        # usual next step after a shadow run is a serve reload of that very candidate)
        stopped = self._stop_shadow("a serve-mode reload replaced the served model")
        return {"previous": old_info, "serving": new_info, "shadow_stopped": stopped}

    # -- shadow runs and rollback -------------------------------------------------------------
    def shadow(self, source: str, *, sample: float = 0.25,
               cpu_share: float = 0.25) -> dict[str, Any]:
        """Fetch, verify and self-test `source` like a reload, then run it beside the served
        model on `sample` of the inferences, its thread busy at most `cpu_share` of the
        time. Serving never changes; a candidate already shadowing is replaced."""
        return self._exclusive(self._shadow_locked, source, sample, cpu_share)

    def _shadow_locked(self, source: str, sample: float, cpu_share: float) -> dict[str, Any]:
        spool = self.telemetry.opts.spool_dir if self.telemetry else None
        serving = f"{self.info['model']} {self.info['version']}"
        candidate, workdir = None, None
        staging = _staging(spool, "shadow",
                           f"shadow run of {source} failed, still serving {serving}")
        try:
            path = fetch_bundle(source, staging)
            candidate, workdir = _load_checked(path, self.trust, self.threads, spool)
            _check_fits(candidate, self.model)
            info = bundle_info(path, candidate)
            runner = ShadowRunner(candidate, info, sample=sample, cpu_share=cpu_share)
        except (BundleError, BackendUnavailable, OSError, ValueError) as exc:
            if candidate is not None:
                _close_model(candidate, workdir)
            if self.telemetry:
                self.telemetry.event("reload_failed", mode="shadow", source=source,
                                     error=str(exc), serving=self.info)
            raise CommandError(f"shadow run of {source} refused, still serving {serving}: "
                               f"{exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        replaced = self._stop_shadow("replaced by another candidate", keep_section=True)
        runner.start()
        self.feedback_listeners.append(runner.feedback)
        if self.telemetry:
            self.telemetry.add_section("shadow", runner.take_window)
        self._shadow, self._shadow_workdir = runner, workdir
        if self.telemetry:
            self.telemetry.event("shadow_started", candidate=info, serving=self.info,
                                 sample=sample, cpu_share=cpu_share)
        return {"mode": "shadow", "candidate": info, "serving": self.info, "sample": sample,
                "every": runner.step, "cpu_share": cpu_share, "replaced": replaced}

    def _stop_shadow(self, reason: str, *, keep_section: bool = False) -> dict[str, Any] | None:
        """End the shadow run if there is one: its totals (None without one)."""
        runner, workdir = self._shadow, self._shadow_workdir
        if runner is None:
            return None
        self._shadow, self._shadow_workdir = None, None
        if self.telemetry and not keep_section:
            self.telemetry.remove_section("shadow")
        if runner.feedback in self.feedback_listeners:
            self.feedback_listeners.remove(runner.feedback)
        totals = runner.stop()
        if runner.running:  # a candidate run outlasted the stop's wait: closing the model
            # under it could crash a native backend; its folder stays until the next start
            log.warning("the shadow candidate is still running after its stop; its model is "
                        "left open")
        else:
            _close_model(runner.model, workdir)
        if self.telemetry:
            self.telemetry.event("shadow_stopped", reason=reason, totals=totals)
        return totals

    def _shadow_stop_locked(self) -> dict[str, Any]:
        totals = self._stop_shadow("shadow_stop command")
        return {"stopped": totals is not None, "totals": totals, "serving": self.info}

    def _rollback_locked(self) -> dict[str, Any]:
        previous, serving = self.previous, f"{self.info['model']} {self.info['version']}"
        if previous is None:
            raise CommandError(f"nothing to roll back to: serving {serving}, and no serve-mode "
                               "reload since it was installed")
        path = Path(previous["path"])
        try:
            intact = sha256_file(path) == previous["sha256"]
        except OSError as exc:
            raise CommandError(f"cannot roll back, still serving {serving}: the bundle served "
                               f"before ({path}) cannot be read: {exc}") from exc
        if not intact:
            raise CommandError(f"cannot roll back, still serving {serving}: the bundle served "
                               f"before ({path}) changed since (sha256 differs)")
        result = self._reload_locked(str(path), rollback=True)
        if self.telemetry:
            self.telemetry.event("rolled_back", bundle=result["serving"],
                                 replaced=result["previous"])
        return {"rolled_back": result["previous"], **result}

    def _keep_bundle(self, path: Path) -> Path:
        """Reloaded bundles live beside the spool (or in a temp folder without one) so that
        `bench` can run them after the staging folder is gone."""
        base = (self.telemetry.opts.spool_dir if self.telemetry
                else Path(tempfile.gettempdir()) / "edgepack-device") / RELOADED
        base.mkdir(parents=True, exist_ok=True)
        dest = base / f"{sha256_file(path)[:16]}.edgepack"
        if dest == self.bundle_path:  # the same bundle again: serving it, do not rewrite it
            return dest
        tmp = dest.with_suffix(".partial")
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _remember_reload(self, kept: Path, info: dict[str, Any],
                         previous: dict[str, str] | None) -> None:
        if not self.telemetry:
            return
        state = self.telemetry.opts.spool_dir / RELOAD_STATE
        tmp = state.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"base_sha256": self.base_sha256, "path": str(kept),
                                       "sha256": info["sha256"], "previous": previous}))
            os.replace(tmp, state)
        finally:
            tmp.unlink(missing_ok=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def flush(self) -> int | None:
        """Close the telemetry window now if it holds inferences, or labels that came after
        its last inference (they would wait for the next window); returns its seq."""
        if self.telemetry is None:
            return None
        if self.capture is not None:  # late labels too, even when no window is open
            self.capture.flush()
        return self.telemetry.flush(force=self._ledger.count > 0)

    def close(self, drain_timeout: float = 10.0) -> dict[str, Any] | None:
        # the last window still carries the candidate's counts (the runner keeps them)
        self._stop_shadow("the device is closing", keep_section=True)
        self.flush()
        stats = self.telemetry.close(drain_timeout) if self.telemetry else None
        _close_model(self.model, self.workdir)
        return stats

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Arg:
    """One command argument: a bounded integer, a number in (low, high] (`low` excluded),
    one of `choices`, or a bundle source (a path or URL); `default` None: required."""
    kind: str  # "int" | "number" | "choice" | "source"
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, command: str, key: str, value: Any) -> Any:
        if self.kind == "int":  # not a bool, a float or a string
            if type(value) is not int or not self.low <= value <= self.high:
                raise CommandError(f"{command} takes args.{key}: an integer from {self.low} "
                                   f"to {self.high}")
        elif self.kind == "number":
            if type(value) not in (int, float) or not self.low < value <= self.high:
                raise CommandError(f"{command} takes args.{key}: a number above {self.low} "
                                   f"and at most {self.high}")
            value = float(value)
        elif self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise CommandError(f"{command} takes args.{key}: one of "
                                   f"{', '.join(map(repr, self.choices))}")
        elif not isinstance(value, str) or not 0 < len(value) <= MAX_SOURCE_CHARS:
            raise CommandError(f"{command} needs args.{key}: a path, file:// or http(s):// "
                               f"URL (at most {MAX_SOURCE_CHARS} characters)")
        return value


SHADOW_ONLY = ("sample", "cpu_share")  # reload arguments that only mode "shadow" takes
_ARGS: dict[str, dict[str, Arg]] = {
    "ping": {},
    "bench": {"runs": Arg("int", 200, 1, 100_000), "warmup": Arg("int", 20, 0, 10_000)},
    "reload": {"bundle": Arg("source"), "mode": Arg("choice", "serve", choices=MODES),
               "sample": Arg("number", 0.25, 0, 1), "cpu_share": Arg("number", 0.25, 0, 1)},
    "shadow_stop": {},
    "rollback": {},
}
COMMANDS = tuple(_ARGS)
MAX_SOURCE_CHARS = 4096


def command_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """A command's arguments checked against what it takes (types, bounds, no strangers);
    CommandError names what is wrong and what is valid."""
    if name not in _ARGS:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise CommandError(f"unknown command {shown!r}; this runtime knows "
                           f"{', '.join(COMMANDS)}")
    spec = _ARGS[name]
    if strangers := sorted(set(args) - set(spec)):
        shown = ", ".join(repr(k[:32]) for k in strangers[:5])
        raise CommandError(f"{name} takes no argument(s) {shown}; it takes "
                           f"{', '.join(spec) or 'none'}")
    out = {key: arg.check(name, key, args.get(key, arg.default)) for key, arg in spec.items()}
    if name == "reload" and out["mode"] != "shadow" and (given := [k for k in SHADOW_ONLY
                                                                   if k in args]):
        raise CommandError(f"reload takes args.{given[0]} only with mode 'shadow'")
    return out


RELOAD_STATE = "reloaded-bundle.json"


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _staging(spool: Path | None, kind: str, failure: str) -> Path:
    """A folder to fetch a bundle into: under the spool when there is one (a killed process's
    folder is removed at the next start). CommandError starting with `failure` if it cannot."""
    try:
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{kind}-",
                                     dir=_ensure(spool / EXTRACTED)) if spool
                    else tempfile.mkdtemp(prefix=f"edgepack-{kind}-"))
    except OSError as exc:
        raise CommandError(f"{failure}: {exc}") from exc


def _load(bundle: Path, trust: TrustStore | None, threads: int | None,
          spool: Path | None) -> tuple[Model, Path | None]:
    """Load without the self-test, extracting under the spool folder when there is one (a
    killed process leaves its folder where the next start finds and removes it)."""
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-",
                                        dir=_ensure(spool / EXTRACTED))) if spool else None
    except OSError:  # the spool's own checks say what is wrong with it, with a clear message
        workdir = None
    if workdir is None:
        return load(bundle, trust=trust, threads=threads, self_test=False), None
    try:
        return load(bundle, trust=trust, threads=threads, self_test=False,
                    workdir=workdir), workdir
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _load_checked(bundle: Path, trust: TrustStore | None, threads: int | None,
                  spool: Path | None) -> tuple[Model, Path | None]:
    """Load, self-test, and read what serving needs (the reference distributions)."""
    model, workdir = _load(bundle, trust, threads, spool)
    try:
        result = model.self_test()
        if not result.ok:
            raise BundleError(result.message)
        dry_window(model, model.reference)
        return model, workdir
    except BaseException:
        _close_model(model, workdir)
        raise


def _check_fits(candidate: Model, served: Model) -> None:
    """A shadow candidate answers the same inputs with the same classes as the served model,
    or comparing their predictions means nothing."""
    if candidate.raw_shape != served.raw_shape:
        raise ValueError(f"the candidate takes inputs shaped {candidate.raw_shape}, the served "
                         f"model {served.raw_shape}")
    if len(candidate.labels) != len(served.labels):
        raise ValueError(f"the candidate has {len(candidate.labels)} classes, the served "
                         f"model {len(served.labels)}")


def _previous_of(state: dict[str, Any]) -> dict[str, str] | None:
    """The bundle to roll back to, as the reload state remembers it (None if it does not)."""
    prev = state.get("previous")
    if (isinstance(prev, dict) and isinstance(prev.get("path"), str)
            and isinstance(prev.get("sha256"), str)):
        return {"path": prev["path"], "sha256": prev["sha256"]}
    return None


def _close_model(model: Model, workdir: Path | None) -> None:
    model.close()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def clean_stale_extractions(spool: Path) -> None:
    """Remove extraction folders of processes that are gone (killed, not closed)."""
    folder = spool / EXTRACTED
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        pid = child.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _prune_bundles(folder: Path, keep: set[Path]) -> None:
    """Keep the bundle serving now and the one before it; older reloads go."""
    for child in folder.glob("*.edgepack"):
        if child not in keep:
            child.unlink(missing_ok=True)


def _read_reload_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resume_reloaded(bundle: Path, spool_dir: Path | None) -> tuple[Path, str | None]:
    """The bundle to serve: the one a reload installed on top of `bundle`, with `bundle`'s
    sha256; or `bundle` itself and None."""
    if spool_dir is None or not bundle.is_file():
        return bundle, None
    state = _read_reload_state(spool_dir / RELOAD_STATE)
    path = Path(state.get("path", ""))
    if state and path.is_file():
        base = sha256_file(bundle)
        if state.get("base_sha256") == base:
            return path, base
    return bundle, None


def fetch_bundle(source: str, folder: Path) -> Path:
    """A local path, file:// or http(s):// URL -> a local file in `folder`, size-bounded."""
    dest = folder / "incoming.edgepack"
    if source.startswith(("http://", "https://")):
        try:
            return _download(source, dest)
        except http.client.HTTPException as exc:  # a server that does not speak HTTP
            raise ValueError(f"{source}: bad HTTP response ({type(exc).__name__})") from exc
    if source.startswith("file://"):
        source = urllib.request.url2pathname(source[len("file://"):])
    elif "://" in source:
        raise ValueError(f"cannot fetch {source!r}: use a path, file://, http:// or https://")
    src = Path(source)
    if not src.is_file():
        raise ValueError(f"{src} is not a file")
    shutil.copyfile(src, dest)
    return dest


def _download(source: str, dest: Path) -> Path:
    """Capped in size and in time, overall and per read."""
    deadline = time.monotonic() + FETCH_DEADLINE_S
    with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT_S) as resp, \
            dest.open("wb") as out:
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > FETCH_MAX_BYTES:
            raise ValueError(f"{source} is larger than {FETCH_MAX_BYTES >> 20} MiB")
        total = 0
        while chunk := resp.read1(1 << 16):
            total += len(chunk)
            if total > FETCH_MAX_BYTES:
                raise ValueError(f"{source} is larger than {FETCH_MAX_BYTES >> 20} MiB")
            if time.monotonic() > deadline:
                raise ValueError(f"{source} took longer than {FETCH_DEADLINE_S} s to "
                                 f"download (got {total} B)")
            out.write(chunk)
    return dest
