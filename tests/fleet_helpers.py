"""Processes for the fleet tests: listeners (`toolchain listen`) and devices
(`edge-runtime replay`/`serve` from the torch-free environment), with their output
collected as it comes."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import RUNTIME_VENV

BIN = Path(sys.executable).parent
EDGE_RUNTIME = RUNTIME_VENV / "bin" / "edge-runtime"


class Proc:
    def __init__(self, args: list, **kw) -> None:
        self.args = [str(a) for a in args]
        self.p = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, **kw)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.err + self.out):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.args[:3]} never said {text!r}: {self.text()}")

    def text(self) -> str:
        return "".join(self.out)[-3000:] + "".join(self.err)[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        rc = self.p.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def wait(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc


def start_listener(broker_url: str, store: Path, *extra, listener_id: str = "L1") -> Proc:
    proc = Proc([BIN / "toolchain", "listen", "--broker", broker_url, "--store",
                 f"sqlite:///{store}", "--listener-id", listener_id, "--stats-every", "1",
                 "--reconnect-max", "1", *extra])
    proc.wait_for("[listen] subscribed")
    return proc


def replay_args(bundle: Path, inputs: Path, broker_url: str, device: str, spool: Path,
                *extra) -> list:
    return [EDGE_RUNTIME, "replay", bundle, "--inputs", inputs, "--broker", broker_url,
            "--device-id", device, "--spool", spool, "--json", "--reconnect-max", "1", *extra]


def replay(*args, timeout: float = 300) -> dict:
    proc = Proc(replay_args(*args))
    rc = proc.wait(timeout)
    assert rc == 0, proc.text()
    return json.loads(proc.out[-1])


def query(store: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(store, timeout=30) as conn:
        return conn.execute(sql, params).fetchall()


def wait_until(predicate, timeout: float = 30, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def seqs(store: Path, device: str, kind: str | None = None) -> list[int]:
    sql = "SELECT seq FROM messages WHERE device_id = ?" + (" AND kind = ?" if kind else "")
    return sorted(r[0] for r in query(store, sql + " ORDER BY seq",
                                      (device, kind) if kind else (device,)))
