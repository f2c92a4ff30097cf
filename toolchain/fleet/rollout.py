"""Phased rollout of a new bundle to the devices running a model's current version, judged
stage by stage against the devices that stay on it.

    rollout = plan(store, "v2.edgepack", RolloutConfig(stages=(25, 100), soak_s=600))
    Driver(store, broker_config, rollout["id"]).run()   # returns the final state

How it goes:
- The scope is one model's devices running `from_version` (by default the version most of
  them run when the rollout starts). Each device gets a bucket, a stable hash of the model
  and its id in 0..9999; a stage at P% takes the devices whose bucket is below 100*P. The
  bucket never changes, so a device stays in its cohort, and a device that joins the scope
  later lands where its hash says. A stage below 100% takes at least one device and leaves
  at least one on the old version (the control), or there is nothing to judge.
- With `shadow_first`, the first stage's cohort first runs the candidate in shadow (the
  `reload` command's shadow mode: it keeps serving the old bundle); its verdict compares
  the candidate with the served model on the same inputs.
- Each stage: send `reload` to its new canaries and wait for each device's result (a
  result never seen is sent again after `reload_timeout_s`, three times at most); the stage
  aborts, as AWS IoT Jobs' abort config does, when more than `max_failure_pct` percent of
  the reloads failed once at least `min_devices` have finished. Then soak for `soak_s`,
  then judge (toolchain.fleet.judge) the canaries' windows against the controls' over the
  same span, from the end of the last reload: promote (next stage), hold (not enough data
  yet: judge again as windows arrive) or roll back (send `rollback` to every canary, which
  reloads the bundle it served before). The last stage (100%) has no control left: it is
  judged on its reloads.
- All of it lives in the store (toolchain.fleet.rollout_store): `toolchain rollout
  status/pause/resume/abort/promote` work from any machine; the driver holds a lease, and
  a new driver takes over when the lease runs out or its holder's process is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime import protocol
from toolchain.errors import ToolchainError, UsageError
from toolchain.fleet import judge
from toolchain.fleet import rollout_store as rs
from toolchain.fleet.store import Store, StoreError

log = logging.getLogger("edgepack.rollout")
BUCKETS = 10_000
LEASE_S = 30.0
MAX_ATTEMPTS = 3
SHADOW = -1  # the stage index of a shadow stage
JUDGE_EVERY_S = 3.0  # a stage on hold is judged again this often (reads every arm's windows)


@dataclass(frozen=True)
class RolloutConfig:
    stages: tuple[float, ...] = (5.0, 25.0, 100.0)
    soak_s: float = 600.0
    shadow_first: bool = False
    min_devices: int = 1
    min_windows: int = 8
    max_failure_pct: float = 10.0
    alpha: float = 0.05
    sample: float = 0.25  # shadow: share of inferences the candidate also runs
    cpu_share: float = 0.25  # shadow: the candidate thread's CPU budget
    reload_timeout_s: float = 120.0
    prefix: str = protocol.DEFAULT_PREFIX
    budget_p95_ms: float | None = None  # the candidate's, from its manifest

    def check(self) -> None:
        if not self.stages or any(not 0 < s <= 100 for s in self.stages) or \
                list(self.stages) != sorted(set(self.stages)) or self.stages[-1] != 100:
            raise UsageError(f"stages {','.join(f'{s:g}' for s in self.stages)}: give rising "
                             "percentages in (0, 100], ending at 100 (e.g. 5,25,100)")
        if self.soak_s < 0 or self.reload_timeout_s <= 0:
            raise UsageError("the soak must be >= 0 s and the reload timeout > 0 s")
        if self.min_devices < 1 or self.min_windows < 1:
            raise UsageError("--min-devices and --min-windows must be at least 1")
        if not 0 <= self.max_failure_pct <= 100 or not 0 < self.alpha < 1:
            raise UsageError("--max-failures is a percentage (0-100), --alpha in (0, 1)")
        if not 0 < self.sample <= 1 or not 0 < self.cpu_share <= 1:
            raise UsageError("--sample and --cpu-share are shares in (0, 1]")
        protocol.check_prefix(self.prefix)


def bucket(model: str, device_id: str) -> int:
    """A device's place in the rollout order of `model`: stable across rollouts and
    machines (a hash, not Python's salted hash())."""
    digest = hashlib.sha256(f"{model}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def cohort(members: list[dict[str, Any]], pct: float) -> set[str]:
    """The devices a stage at `pct` percent has on the new bundle: buckets below the cut,
    at least one, and (below 100%) at least one left as control."""
    ordered = sorted(members, key=lambda m: (m["bucket"], m["device_id"]))
    if not ordered:
        return set()
    chosen = [m for m in ordered if m["bucket"] < pct * BUCKETS / 100]
    if not chosen:
        chosen = ordered[:1]
    if pct < 100 and len(chosen) == len(ordered):
        chosen = ordered[:-1]
    return {m["device_id"] for m in chosen}


@dataclass(frozen=True)
class Candidate:
    path: Path
    model: str
    version: str
    sha256: str
    budget_p95_ms: float | None


def read_candidate(path: Path) -> Candidate:
    """The new bundle's identity, after verifying it the way a device will."""
    import tempfile

    from runtime.bundle import BundleError, extract_bundle, sha256_file

    if not path.is_file():
        raise UsageError(f"bundle {path}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            m = extract_bundle(path, Path(tmp))
        except BundleError as exc:
            raise UsageError(f"bundle {path}: {exc}") from exc
    budget = (m.target.budgets or {}).get("p95_latency_ms")
    return Candidate(path, m.model.name, m.model.version, sha256_file(path),
                     float(budget) if isinstance(budget, int | float) else None)


def plan(store: Store, candidate: Candidate, config: RolloutConfig, *, bundle_url: str,
         from_version: str | None = None) -> dict[str, Any]:
    """Create a rollout in the store and return it. The scope's version is `from_version`
    or the one most of the model's devices run."""
    config.check()
    devices = rs.scope_devices(store, candidate.model)
    if from_version is None:
        counts: dict[str, int] = {}
        for d in devices:
            if d["model_version"] is not None and d["model_version"] != candidate.version:
                counts[d["model_version"]] = counts.get(d["model_version"], 0) + 1
        if not counts:
            raise UsageError(f"no device in the store runs model {candidate.model!r} at a "
                             f"version other than {candidate.version!r}: nothing to roll "
                             f"out to")
        from_version = max(counts, key=lambda v: (counts[v], v))
    if from_version == candidate.version:
        raise UsageError(f"the bundle is version {from_version} already")
    if busy := rs.active_for(store, candidate.model):
        raise UsageError(f"rollout {busy[0]['id']} of {candidate.model} is still "
                         f"{busy[0]['state']}: finish, abort or resume it first")
    # a device that said it is offline (or whose last will did) is left out: it cannot
    # reload now, and a failure it cannot help would count against the new version
    members = [d for d in devices if d["model_version"] == from_version
               and d["state"] != "offline"]
    if len(members) < 2:
        raise UsageError(f"{len(members)} device(s) online run {candidate.model} "
                         f"{from_version}: a phased rollout needs at least 2 (a canary and a "
                         f"control)")
    now = time.time()
    row = {"id": f"ro-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-"
                 f"{uuid.uuid4().hex[:6]}",
           "model": candidate.model, "from_version": from_version,
           "to_version": candidate.version, "sha256": candidate.sha256, "bundle": bundle_url,
           "config": asdict(config) | {"budget_p95_ms": candidate.budget_p95_ms},
           "state": "running", "stage": SHADOW if config.shadow_first else 0,
           "phase": "sending", "phase_at": now, "created_at": now, "updated_at": now}
    try:
        rs.create(store, row)
    except StoreError as exc:  # another `rollout start` of this model got there first
        if busy := rs.active_for(store, candidate.model):
            raise UsageError(f"rollout {busy[0]['id']} of {candidate.model} is still "
                             f"{busy[0]['state']}: finish, abort or resume it first") from exc
        raise
    rs.add_devices(store, row["id"], [(d["device_id"], bucket(candidate.model, d["device_id"]))
                                      for d in members])
    return rs.get(store, row["id"]) or row


def stage_name(rollout: dict[str, Any], stage: int | None = None) -> str:
    stage = rollout["stage"] if stage is None else stage
    stages = rollout["config"]["stages"]
    if stage == SHADOW:
        return f"shadow ({stages[0]:g}%)"
    return f"stage {stage + 1}/{len(stages)} ({stages[stage]:g}%)"


@dataclass
class Driver:
    """Drives one rollout to its end: one `step()` at a time, each reading the state from
    the store, so that it can stop anywhere and another driver can carry on."""
    store: Store
    broker: Any  # runtime.mqtt.BrokerConfig
    rollout_id: str
    poll_s: float = 1.0
    echo: Callable[[str], None] = field(default=lambda line: None)
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _conn: Any = None
    _next_judge: float = 0.0
    _sent: int = 0

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Drive until the rollout ends (or `stop` is set); returns the rollout's row."""
        stop = stop or threading.Event()
        self._take_lease(stop)
        self._connect()
        try:
            while not stop.is_set():
                rollout = rs.get(self.store, self.rollout_id)
                assert rollout is not None
                if rollout["state"] in rs.TERMINAL:
                    return rollout
                self._renew()
                if rollout["state"] != "paused" or rollout["request"] == "abort" or \
                        rollout["phase"] == "rolling_back":
                    self.step(rollout)
                stop.wait(self.poll_s)
            return rs.get(self.store, self.rollout_id) or {}
        finally:
            rs.release_lease(self.store, self.rollout_id, self.owner)
            if self._conn is not None:
                self._conn.stop()

    def _take_lease(self, stop: threading.Event) -> None:
        """Become the driver: at once when the lease is free or its holder's process is
        gone, else when the holder's lease runs out (or `stop` is set: ToolchainError)."""
        said = False
        while True:
            rollout = rs.get(self.store, self.rollout_id)
            if rollout is None:
                raise UsageError(f"no rollout {self.rollout_id!r} in the store")
            holder = rs.take_lease(self.store, self.rollout_id, self.owner,
                                   time.time() + LEASE_S,
                                   holder_gone=holder_gone(rollout["owner"]))
            if holder is None:
                return
            if stop.is_set():
                raise ToolchainError(f"rollout {self.rollout_id} is driven by {holder}")
            if not said:
                self.echo(f"[rollout] {holder} drives {self.rollout_id}; taking over when its "
                          f"lease runs out (within {LEASE_S:g} s)")
                said = True
            stop.wait(1.0)

    def _renew(self) -> None:
        holder = rs.take_lease(self.store, self.rollout_id, self.owner, time.time() + LEASE_S)
        if holder is not None:
            raise ToolchainError(f"rollout {self.rollout_id}: {holder} took over the lease")

    def _connect(self) -> None:
        from runtime.mqtt import Connection

        self._conn = Connection(self.broker, f"edgepack-rollout-{self.rollout_id}"
                                             f"-{os.getpid()}").start()
        if not self._conn.wait_connected(10):
            self.echo(f"[rollout] broker {self.broker.url} not reachable yet; commands wait "
                      f"for it")

    # -- one step -----------------------------------------------------------------------
    def step(self, rollout: dict[str, Any]) -> None:
        if rollout["request"] == "abort" and rollout["phase"] != "rolling_back":
            self._begin_rollback(rollout, "aborted on request", final="aborted")
            return
        phase = rollout["phase"]
        if phase == "sending":
            self._sending(rollout)
        elif phase == "soaking":
            if rollout["request"] == "promote" or \
                    time.time() >= rollout["soak_from"] + rollout["config"]["soak_s"]:
                rs.update(self.store, self.rollout_id, phase="judging", phase_at=time.time())
        elif phase == "judging":
            self._judging(rollout)
        elif phase == "rolling_back":
            self._rolling_back(rollout)

    def _members(self, rollout: dict[str, Any]) -> list[dict[str, Any]]:
        """The rollout's devices, with devices that joined the scope since added."""
        known = {m["device_id"] for m in rs.rollout_devices(self.store, self.rollout_id)}
        fresh = [(d["device_id"], bucket(rollout["model"], d["device_id"]))
                 for d in rs.scope_devices(self.store, rollout["model"])
                 if d["device_id"] not in known and d["state"] != "offline"
                 and d["model_version"] == rollout["from_version"]]
        rs.add_devices(self.store, self.rollout_id, fresh)
        return rs.rollout_devices(self.store, self.rollout_id)

    def _sending(self, rollout: dict[str, Any]) -> None:
        stage, cfg = rollout["stage"], rollout["config"]
        members = self._members(rollout)
        pct = cfg["stages"][0 if stage == SHADOW else stage]
        movable = [m for m in members if m["role"] in ("control", "shadow")]
        # canaries of earlier stages stay; the cut is taken over every member's bucket
        wanted = cohort([m for m in members if m["role"] != "left"], pct)
        role = "shadow" if stage == SHADOW else "canary"
        targets = [m for m in movable if m["device_id"] in wanted and m["role"] != role]
        targets += [m for m in members if m["role"] == role and m["state"] in ("sent",)]
        if stage == SHADOW:
            command = {"command": "reload", "args": {
                "bundle": rollout["bundle"], "mode": "shadow", "sample": cfg["sample"],
                "cpu_share": cfg["cpu_share"]}}
        else:
            command = {"command": "reload", "args": {"bundle": rollout["bundle"]}}
        for m in targets:
            if m["role"] != role:
                m = self._send(rollout, m, command, role=role)
            self._collect(rollout, m, command)
        members = rs.rollout_devices(self.store, self.rollout_id)
        mine = [m for m in members if m["role"] == role]
        done = [m for m in mine if m["state"] == "done"]
        failed = [m for m in mine if m["state"] == "failed"]
        finished = len(done) + len(failed)
        if failed and finished >= cfg["min_devices"] and \
                100 * len(failed) / finished > cfg["max_failure_pct"]:
            why = (f"{len(failed)} of {finished} reloads failed (over "
                   f"{cfg['max_failure_pct']:g}%): "
                   + "; ".join(f"{m['device_id']}: {m['error']}" for m in failed[:3]))
            rs.add_verdict(self.store, self.rollout_id, stage, "rollback", why,
                           {"failed": [m["device_id"] for m in failed],
                            "finished": finished})
            self._begin_rollback(rollout, why, final="rolled_back")
            return
        if mine and finished == len(mine):
            now = time.time()
            rs.update(self.store, self.rollout_id, phase="soaking", phase_at=now, soak_from=now)
            self.echo(f"[rollout] {stage_name(rollout)}: {len(done)} device(s) on "
                      f"{rollout['to_version']}" + (" in shadow" if stage == SHADOW else "")
                      + (f", {len(failed)} failed" if failed else "")
                      + f"; soaking {cfg['soak_s']:g} s")

    def _send(self, rollout: dict[str, Any], m: dict[str, Any], command: dict[str, Any],
              *, role: str | None = None) -> dict[str, Any]:
        attempts = m["attempts"] + 1 if m["state"] == "sent" else 1
        cid = f"{self.rollout_id}:{rollout['stage']}:{command['command']}:{attempts}"
        seq = rs.device_seq(self.store, m["device_id"])
        payload = json.dumps({**command, "id": cid}).encode()
        topic = protocol.topic(rollout["config"]["prefix"], m["device_id"], protocol.COMMANDS)
        # a command the broker still holds for an offline device expires with its attempt:
        # a device back after the rollout ended must not reload what the rollout gave up
        self._conn.publish(topic, payload,
                           expiry_s=max(1, round(rollout["config"]["reload_timeout_s"])))
        self._sent += 1
        if self._sent % 50 == 0:
            self._renew()
        values = {"state": "sent", "command": command["command"], "command_id": cid,
                  "sent_at": time.time(), "seq_at_send": seq, "attempts": attempts,
                  "error": None}
        if role is not None:
            values["role"] = role
        rs.set_device(self.store, self.rollout_id, m["device_id"], **values)
        return {**m, **values}

    def _answer(self, m: dict[str, Any]) -> bool | str | None:
        """The device's answer to the command last sent to it, any attempt of it: True
        (one attempt succeeded), the error text (failed), or None (none yet; an attempt
        refused because an earlier one is still running is no answer)."""
        prefix = m["command_id"].rsplit(":", 1)[0] + ":"
        error = None
        for raw in rs.results_since(self.store, m["device_id"], m["seq_at_send"] or 0):
            try:
                body = json.loads(raw).get("body") or {}
            except ValueError:
                continue
            if not isinstance(body, dict) or not str(body.get("id", "")).startswith(prefix):
                continue
            if body.get("ok"):
                return True
            text = str(body.get("error"))[:500]
            if "already in progress" not in text:
                error = text
        return error

    def _collect(self, rollout: dict[str, Any], m: dict[str, Any],
                 command: dict[str, Any]) -> None:
        """Read the device's answer to the command sent; send it again when none came in
        time, fail it after MAX_ATTEMPTS."""
        answer = self._answer(m)
        if answer is not True and answer is not None and m["command"] == "rollback" and \
                answer.startswith("nothing to roll back to"):
            answer = True  # an earlier attempt did it (a device rolls back once)
        if answer is True:
            rs.set_device(self.store, self.rollout_id, m["device_id"], state="done")
        elif answer is not None:
            rs.set_device(self.store, self.rollout_id, m["device_id"], state="failed",
                          error=answer)
        elif time.time() - (m["sent_at"] or 0) < rollout["config"]["reload_timeout_s"]:
            return
        elif m["attempts"] >= MAX_ATTEMPTS:
            rs.set_device(self.store, self.rollout_id, m["device_id"], state="failed",
                          error=f"no answer to {MAX_ATTEMPTS} attempts")
        else:
            self._send(rollout, m, command)

    def _judging(self, rollout: dict[str, Any]) -> None:
        stage = rollout["stage"]
        if rollout["request"] != "promote" and time.monotonic() < self._next_judge:
            return
        self._next_judge = time.monotonic() + JUDGE_EVERY_S
        members = rs.rollout_devices(self.store, self.rollout_id)
        if rollout["request"] == "promote":
            verdict = judge.Verdict("promote", "promoted by hand (toolchain rollout promote)",
                                    ())
            detail: dict[str, Any] = verdict.to_dict()
        else:
            verdict, detail = self._verdict(rollout, members)
        last = rs.verdicts(self.store, self.rollout_id)
        last = [v for v in last if v["stage"] == stage]
        if not last or (last[-1]["decision"], last[-1]["reason"]) != \
                (verdict.decision, verdict.reason):
            rs.add_verdict(self.store, self.rollout_id, stage, verdict.decision,
                           verdict.reason, detail)
            self.echo(f"[rollout] {stage_name(rollout)} verdict: {verdict.decision} "
                      f"({verdict.reason})")
            for line in describe_metrics(detail.get("metrics", [])):
                self.echo(f"[rollout]   {line}")
        if verdict.decision == "hold":
            return
        if verdict.decision == "rollback":
            self._begin_rollback(rollout, verdict.reason, final="rolled_back")
            return
        self._promote(rollout, members)

    def _verdict(self, rollout: dict[str, Any],
                 members: list[dict[str, Any]]) -> tuple[judge.Verdict, dict[str, Any]]:
        stage, cfg = rollout["stage"], rollout["config"]
        since = rollout["soak_from"]
        span = {"since": since, "until": time.time()}
        if stage == SHADOW:
            ids = [m["device_id"] for m in members if m["role"] == "shadow"
                   and m["state"] == "done"]
            rows = [w for w in rs.windows_since(self.store, ids, since)
                    if w["shadow_sha256"] == rollout["sha256"]]
            verdict = judge.judge(rows, rows, metrics=judge.SHADOW_METRICS,
                                  min_windows=cfg["min_windows"], alpha=cfg["alpha"],
                                  budget_p95_ms=cfg.get("budget_p95_ms"))
            agreement = [w["shadow_agreement"] for w in rows
                         if w["shadow_agreement"] is not None]
            return verdict, {**verdict.to_dict(), **span, "canary": ids, "control": ids,
                             "shadow_agreement_median": judge.median(agreement)
                             if agreement else None}
        canary = [m["device_id"] for m in members if m["role"] == "canary"
                  and m["state"] == "done"]
        control = [m["device_id"] for m in members if m["role"] == "control"]
        if not control:  # the last stage: everyone moved, nothing to compare with
            verdict = judge.Verdict("promote", f"every device reloaded ({len(canary)}); no "
                                               f"control left to judge against", ())
            return verdict, {**verdict.to_dict(), **span, "canary": canary, "control": []}
        rows_canary = [w for w in rs.windows_since(self.store, canary, since)
                       if w["bundle_sha256"] == rollout["sha256"]]
        rows_control = [w for w in rs.windows_since(self.store, control, since)
                        if w["model_version"] == rollout["from_version"]]
        short = [(arm, n) for arm, n in (("canary", len({w["device_id"] for w in rows_canary})),
                                         ("control", len({w["device_id"] for w in rows_control})))
                 if n < cfg["min_devices"]]
        if short:
            reason = "; ".join(f"{n} {arm} device(s) reported, needs {cfg['min_devices']}"
                               for arm, n in short)
            verdict = judge.Verdict("hold", f"not enough devices: {reason}", ())
        else:
            verdict = judge.judge(rows_canary, rows_control, min_windows=cfg["min_windows"],
                                  alpha=cfg["alpha"], budget_p95_ms=cfg.get("budget_p95_ms"))
        return verdict, {**verdict.to_dict(), **span, "canary": canary, "control": control}

    def _promote(self, rollout: dict[str, Any], members: list[dict[str, Any]]) -> None:
        stage, stages = rollout["stage"], rollout["config"]["stages"]
        if stage == SHADOW:
            for m in members:  # the shadowing devices go back to plain controls
                if m["role"] == "shadow":
                    self._send(rollout, m, {"command": "shadow_stop", "args": {}})
                    rs.set_device(self.store, self.rollout_id, m["device_id"], role="control",
                                  state="idle")
        if stage + 1 >= len(stages):
            rs.clear_request(self.store, self.rollout_id, "promote")
            rs.update(self.store, self.rollout_id, state="completed", phase="done",
                      phase_at=time.time(),
                      message=f"{rollout['to_version']} on every device of the scope")
            self.echo(f"[rollout] {self.rollout_id} completed: {rollout['model']} "
                      f"{rollout['to_version']} everywhere")
            return
        rs.clear_request(self.store, self.rollout_id, "promote")
        rs.update(self.store, self.rollout_id, stage=stage + 1, phase="sending",
                  phase_at=time.time(), soak_from=None)
        self.echo(f"[rollout] promoted to {stage_name(rollout, stage + 1)}")

    # -- rolling back -------------------------------------------------------------------
    def _begin_rollback(self, rollout: dict[str, Any], why: str, *, final: str) -> None:
        """Turn to rolling back (whatever the pause: an abort of a paused rollout goes
        through); _rolling_back does the work, again after a restart half-way."""
        rs.update(self.store, self.rollout_id, phase="rolling_back", phase_at=time.time(),
                  state="running", message=f"{final}: {why}")
        rs.clear_request(self.store, self.rollout_id, rollout["request"])
        self.echo(f"[rollout] rolling back: {why}")
        rollout = rs.get(self.store, self.rollout_id) or rollout
        self._rolling_back(rollout)

    def _undo(self, rollout: dict[str, Any]) -> None:
        """Every device still on the candidate gets its undo; idempotent (it switches each
        device's role as it goes), so a driver restarted half-way finishes the job."""
        for m in rs.rollout_devices(self.store, self.rollout_id):
            undo = {"canary": "rollback", "shadow": "shadow_stop"}.get(m["role"])
            if undo is None:
                continue
            if m["state"] == "done":
                self._send(rollout, {**m, "state": "idle"}, {"command": undo, "args": {}},
                           role="rollback")
            elif m["state"] == "sent":
                # its reload may still land: wait for its answer before undoing it (a
                # rollback on a device that never reloaded would go one bundle too far)
                rs.set_device(self.store, self.rollout_id, m["device_id"], role="rollback",
                              state="check", command=undo)
            else:  # its reload failed: the old bundle serves
                rs.set_device(self.store, self.rollout_id, m["device_id"], role="rollback",
                              state="done", command=undo,
                              error=m["error"] or "its reload had failed: nothing to undo")

    def _rolling_back(self, rollout: dict[str, Any]) -> None:
        self._undo(rollout)
        for m in rs.rollout_devices(self.store, self.rollout_id):
            if m["role"] != "rollback":
                continue
            if m["state"] == "sent":
                self._collect(rollout, m, {"command": m["command"], "args": {}})
            elif m["state"] == "check":
                answer = self._answer(m)
                if answer is True:  # the reload did land: undo it
                    self._send(rollout, {**m, "state": "idle"},
                               {"command": m["command"], "args": {}})
                elif answer is not None:
                    rs.set_device(self.store, self.rollout_id, m["device_id"], state="done",
                                  error=f"reload had failed, nothing to undo ({answer})")
                elif time.time() - (m["sent_at"] or 0) >= \
                        rollout["config"]["reload_timeout_s"] * MAX_ATTEMPTS:
                    rs.set_device(self.store, self.rollout_id, m["device_id"], state="failed",
                                  error="its reload never answered: check the device")
        members = [m for m in rs.rollout_devices(self.store, self.rollout_id)
                   if m["role"] == "rollback"]
        if any(m["state"] in ("sent", "check") for m in members):
            return
        final = (rollout["message"] or "rolled_back:").split(":", 1)[0]
        final = final if final in ("aborted", "rolled_back") else "rolled_back"
        failed = [m["device_id"] for m in members if m["state"] == "failed"]
        rs.update(self.store, self.rollout_id, state=final, phase="done",
                  phase_at=time.time(),
                  message=(rollout["message"] or final)
                  + (f"; rollback failed on {', '.join(failed)}" if failed else ""))
        self.echo(f"[rollout] {self.rollout_id} {final.replace('_', ' ')}"
                  + (f"; rollback failed on {', '.join(failed)}" if failed else ""))


def holder_gone(owner: str | None) -> bool:
    """Whether a lease holder `host:pid` is a process of this machine that has ended."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def describe_metrics(metrics: list[dict[str, Any]]) -> list[str]:
    """One line per judged metric: medians, windows per arm, U and the one-sided p."""
    lines = []
    for m in metrics:
        med = ("-" if m["canary_median"] is None else f"{m['canary_median']:.4g}",
               "-" if m["control_median"] is None else f"{m['control_median']:.4g}")
        stats = (f"U={m['u']:g} p(worse)={m['p_worse']:.3g} ({m['test']}, alpha "
                 f"{m['alpha']:.3g})" if m.get("u") is not None else m.get("note", ""))
        lines.append(f"{m['metric']:<16} {m['status']:<12} canary {med[0]:>8} "
                     f"(n={m['canary_n']}) control {med[1]:>8} (n={m['control_n']}) {stats}")
    return lines
