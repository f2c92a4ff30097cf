"""A real Mosquitto for the tests: started on a free loopback port, with persistence in a
temporary folder (so a restart keeps sessions, as a production broker does; or without, a
broker that loses its state when it restarts), optionally with a password file or TLS (a CA,
server and client certificates made here with openssl). `stop` then `start` restarts it on
the same port.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=edgepack test CA", "-keyout", "ca.key", "-out", "ca.crt")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "spk-test")):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
            *(["-extfile", "san.ext"] if name == "server" else []))
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                    "client.key")}


class Broker:
    def __init__(self, folder: Path, *, users: dict[str, str] | None = None,
                 tls: dict[str, Path] | None = None, require_client_cert: bool = False,
                 port: int | None = None, persistence: bool = True,
                 options: dict[str, str] | None = None) -> None:
        """`options`: mosquitto.conf settings that replace (or add to) the ones below, e.g.
        a benchmark's larger queue limits."""
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        # Run as whoever runs the tests: as root, mosquitto would otherwise drop to the
        # `mosquitto` user, who cannot read pytest's private temporary folders.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1",
                 f"persistence {'true' if persistence else 'false'}",
                 f"persistence_location {folder}/", "autosave_interval 1",
                 f"log_dest file {folder}/mosquitto.log", "log_type error",
                 "log_type warning", "log_type notice", "log_type information",
                 "max_queued_messages 100000", "max_inflight_messages 100"]
        if users:
            pw = folder / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True,
                               capture_output=True)
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            lines += [f"cafile {tls['ca.crt']}", f"certfile {tls['server.crt']}",
                      f"keyfile {tls['server.key']}"]
            if require_client_cert:
                lines += ["require_certificate true"]
        for key, value in (options or {}).items():
            lines = [line for line in lines if line.split(" ", 1)[0] != key]
            lines.append(f"{key} {value}")
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}"
                                   f"{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text()[-3000:] if path.exists() else ""
