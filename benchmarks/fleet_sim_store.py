"""The store side of benchmarks/fleet_sim.py: a fresh store per scenario (a SQLite file, or
a PostgreSQL database created here and dropped afterwards, so nothing else in the server is
touched), and what the simulator reads back from it: how many messages are stored, each
device's seqs, the receive times and the bytes on disk."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np


class SimStore:
    def __init__(self, kind: str, folder: Path, pg_url: str, name: str) -> None:
        self.kind = kind
        self.path = folder / "fleet.db"
        self._admin_url = pg_url
        self.db = f"edgepack_sim_{os.getpid()}_{name}".lower().replace("-", "_")
        if kind == "sqlite":
            self.url = f"sqlite:///{self.path}"
        else:
            parts = urlsplit(pg_url)
            self.url = urlunsplit(parts._replace(path=f"/{self.db}"))
        self._conn: Any = None
        self._created = False

    def create(self) -> None:
        """The database and its schema, before any listener starts: listeners starting
        together on an empty PostgreSQL would race to create the same tables."""
        from toolchain.fleet.store import open_store

        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(self._admin_url, autocommit=True, connect_timeout=10) as c:
                c.execute(f'CREATE DATABASE "{self.db}"')
            self._created = True
        open_store(self.url).close()
        if self.kind == "sqlite":
            self._conn = sqlite3.connect(self.path, timeout=30)
        else:
            import psycopg

            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def _one(self, sql: str, params: tuple = ()) -> Any:
        return self._conn.execute(sql, params).fetchone()[0]

    def _all(self, sql: str) -> list[tuple]:
        return self._conn.execute(sql).fetchall()

    def count(self) -> int:
        """Messages stored, cheaply, for progress and the backlog cap: SQLite's largest rowid
        (nothing is deleted), on PostgreSQL the devices' message counters (kept by ingest in
        the same transaction; the statistics' insert counter lagged by seconds behind four
        busy listeners, and the backlog cap then throttled the publishers to it)."""
        if self.kind == "sqlite":
            return int(self._one("SELECT COALESCE(MAX(rowid), 0) FROM messages"))
        return int(self._one("SELECT COALESCE(SUM(messages), 0) FROM devices"))

    def exact_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM messages"))

    def backend_pids(self) -> list[int]:
        """PostgreSQL's server processes for this database's other connections (the
        listeners'), whose CPU the simulator reports."""
        if self.kind != "postgresql":
            return []
        return [r[0] for r in self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.db,)).fetchall()]

    def size_bytes(self) -> int:
        if self.kind == "sqlite":
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))
        return int(self._one("SELECT pg_database_size(current_database())"))

    def per_device(self) -> dict[str, tuple[int, int, int]]:
        """device -> (messages stored, lowest seq, highest seq)."""
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in self._all(
            "SELECT device_id, COUNT(*), MIN(seq), MAX(seq) FROM messages GROUP BY device_id")}

    def receive_times(self) -> tuple[np.ndarray, np.ndarray]:
        """Every message's received_at (sorted) and received_at - time.wall (its publish
        time), in seconds."""
        rows = self._all("SELECT received_at, wall_time FROM messages")
        a = np.array(rows, dtype=np.float64).reshape(-1, 2)
        return np.sort(a[:, 0]), a[:, 0] - a[:, 1]

    def other_counts(self) -> dict[str, int]:
        return {"windows": int(self._one("SELECT COUNT(*) FROM windows")),
                "dead_letters": int(self._one("SELECT COUNT(*) FROM dead_letters")),
                "triggers": int(self._one("SELECT COUNT(*) FROM triggers"))}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._created:
            import psycopg

            with psycopg.connect(self._admin_url, autocommit=True, connect_timeout=10) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            self._created = False
