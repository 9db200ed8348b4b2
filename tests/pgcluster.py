"""A private PostgreSQL cluster for the tests: own data folder, own loopback port, trust auth.

The tests never depend on a server that happens to run on the machine (its
port, its settings, its other databases).  ``initdb`` refuses to run as root,
so as root the cluster belongs to the package's ``postgres`` user (looked up,
not hardcoded), its folder under /tmp because pytest's tmp_path is 0700 root.
Durability settings are off: a test cluster is thrown away, and fsync per
commit would make the suite wait on the disk.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

SERVER_USER = "postgres"
SERVER_PACKAGE = "postgresql"  # Debian's package with initdb and postgres


@dataclass
class PgCluster:
    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: sessions are ended
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def server_bin() -> Path:
    """The newest installed server's bin folder; a clear error naming the package when there is none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise RuntimeError(f"PostgreSQL's server (initdb, postgres) is required for the tests and is not "
                           f"installed: apt-get install {SERVER_PACKAGE} (scripts/test.sh does it)")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


def start_cluster() -> PgCluster:
    """initdb a new cluster, start it on a free loopback port, wait until it answers."""
    binaries = server_bin()
    root = Path(tempfile.mkdtemp(prefix="mailbot-pg-"))
    root.chmod(0o755)
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if os.geteuid() == 0:
        owner = pwd.getpwnam(SERVER_USER)
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(sockets, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        _as_server_user([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                         "-E", "UTF8", "--locale=C", "--no-sync"]),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    port = _free_port()
    with (root / "postgres.log").open("wb") as log:
        process = subprocess.Popen(
            _as_server_user([str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                             "-c", "full_page_writes=off", "-c", "max_connections=300"]),
            stdout=log, stderr=subprocess.STDOUT,
        )
    cluster = PgCluster(root, port, process)
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(cluster.admin_url, connect_timeout=2):
                return cluster
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                output = (root / "postgres.log").read_text(errors="replace")[-2000:]
                cluster.stop()
                raise RuntimeError(f"the private PostgreSQL did not start on port {port}:\n{output}") from None
            time.sleep(0.1)
