"""A private Dovecot for tests and benchmarks: own config, own users, own port, own mail store.

It never reads /etc/dovecot nor listens on a system port.  Dovecot refuses to
run mail processes as root, so mail belongs to the package's ``dovecot`` user
(looked up, not hardcoded) and logins run as ``dovenull``.  The store lives in a
world-traversable folder under /tmp because pytest's tmp_path is 0700 root.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from imapclient import IMAPClient

DOVECOT = "/usr/sbin/dovecot"
MAIL_USER = "dovecot"
LOGIN_USER = "dovenull"
# Dovecot 2.3's default list minus IDLE and MOVE (and optionally UIDPLUS), so the
# polling path and the COPY + STORE + EXPUNGE path run against a real server.
BASE_CAPABILITIES = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
    "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY LITERAL+ SPECIAL-USE"
)

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = {instance}
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl_lines}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_login_user = {login_user}
default_internal_user = {mail_user}
default_internal_group = {mail_group}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:{root}/mail/%u
mail_max_userip_connections = 200
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
{capability_line}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Dovecot:
    """One private Dovecot; ``start()``/``stop()``/``restart()`` keep port and mail store."""

    idle: bool = True
    move: bool = True
    uidplus: bool = True
    tls: bool = False  # STARTTLS on `port` and implicit TLS on `tls_port`, self-signed for 127.0.0.1
    host: str = "127.0.0.1"
    user: str = "mailbot"
    password: str = "intake-sekret"
    port: int = field(default_factory=free_port)
    tls_port: int = 0
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mailbot-dovecot-")))
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        account = pwd.getpwnam(MAIL_USER)
        uid, gid = account.pw_uid, account.pw_gid
        self.root.chmod(0o755)
        for name in ("run", "state"):
            (self.root / name).mkdir(exist_ok=True)
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, uid, gid)
        passwd = self.root / "passwd"
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n", encoding="utf-8")
        passwd.chmod(0o644)
        capabilities = []
        if not (self.idle and self.move and self.uidplus):
            capabilities = BASE_CAPABILITIES.split()
            if self.idle:
                capabilities.append("IDLE")
            if self.move:
                capabilities.append("MOVE")
            if not self.uidplus:
                capabilities.remove("UIDPLUS")
        (self.root / "dovecot.conf").write_text(
            CONFIG.format(
                root=self.root,
                instance=self.instance,
                port=self.port,
                login_user=LOGIN_USER,
                mail_user=MAIL_USER,
                mail_group=grp.getgrgid(gid).gr_name,
                uid=uid,
                gid=gid,
                capability_line=f"imap_capability = {' '.join(capabilities)}" if capabilities else "",
                ssl_lines=self._tls_setup(),
                tls_port=self.tls_port,
            ),
            encoding="utf-8",
        )

    @property
    def certificate(self) -> Path:
        """The self-signed certificate (tls mode): point SSL_CERT_FILE at it to trust the server."""
        return self.root / "cert.pem"

    def _tls_setup(self) -> str:
        if not self.tls:
            return "ssl = no"
        self.tls_port = self.tls_port or free_port()
        key = self.root / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(self.certificate)],
            check=True, capture_output=True,
        )
        return f"ssl = yes\nssl_cert = <{self.certificate}\nssl_key = <{key}"

    @property
    def instance(self) -> str:
        """Dovecot names its processes ``<instance>/<service>``: how leftovers are found."""
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    def start(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            raise RuntimeError("private Dovecot is already running")
        # -F keeps the master in the foreground as our child, so stop() can
        # always reap it; its own process group lets us signal it alone.
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.wait_until_answers(timeout)

    def wait_until_answers(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"private Dovecot exited with {self.process.returncode}: {error}{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as probe:
                    if probe.recv(200).startswith(b"* OK"):
                        return
            except OSError as error:
                last_error = error
            time.sleep(0.05)
        raise RuntimeError(f"private Dovecot did not answer on {self.host}:{self.port}: {last_error}\n{self.log()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        # SIGTERM to the whole group at once: signalling the master alone makes it
        # wait a second for its children, on every stop of every test.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()
        # The master does not wait for its children: imap, log and stats processes
        # outlive it (re-parented to init) and would keep serving old connections.
        self._end_children()

    def _children(self) -> list[int]:
        # Titles read "dovecot-<instance>/imap"; the instance name is the random root folder name.
        marker = f"{self.instance}/".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker not in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                    continue
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            except OSError:
                continue
            pids.append(int(entry.name))
        return pids

    def _end_children(self) -> None:
        deadline = time.monotonic() + 2
        sent = signal.SIGTERM
        while pids := self._children():
            if time.monotonic() > deadline:
                if sent == signal.SIGKILL:
                    raise RuntimeError(f"private Dovecot processes {pids} survived SIGKILL")
                sent, deadline = signal.SIGKILL, time.monotonic() + 5
            for pid in pids:
                try:
                    os.kill(pid, sent)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def client(self, folder: str | None = None) -> IMAPClient:
        """A logged-in client; with ``folder``, that folder is selected."""
        client = IMAPClient(self.host, port=self.port, ssl=False, timeout=30)
        client.login(self.user, self.password)
        if folder is not None:
            client.select_folder(folder)
        return client

    def env(self) -> dict[str, str]:
        """MAILBOT_* variables that point mailbot at this server."""
        return {
            "MAILBOT_IMAP_HOST": self.host,
            "MAILBOT_IMAP_PORT": str(self.port),
            "MAILBOT_IMAP_USER": self.user,
            "MAILBOT_IMAP_PASSWORD": self.password,
            "MAILBOT_IMAP_TLS": "none",
        }

    def append(self, mails: list[bytes], folder: str = "INBOX") -> None:
        """APPEND the mails over IMAP, as a delivery would place them (MULTIAPPEND, 100 at a time)."""
        with self.client() as client:
            for start in range(0, len(mails), 100):
                client.multiappend(folder, mails[start : start + 100])

    def count(self, folder: str) -> int:
        with self.client() as client:
            if not client.folder_exists(folder):
                return 0
            return int(client.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"])


def running_dovecot(**modes: bool) -> Iterator[Dovecot]:
    server = Dovecot(**modes)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def dovecot(request: pytest.FixtureRequest) -> Iterator[Dovecot]:
    """A started private Dovecot.

    ``@pytest.mark.parametrize("dovecot", [{"idle": False, "move": False}], indirect=True)`` selects a
    server that does not advertise IDLE / MOVE / UIDPLUS; ``{"tls": True}`` one with STARTTLS and
    implicit TLS (``tls_port``) under a self-signed certificate (``certificate``).
    """
    modes = getattr(request, "param", {})
    yield from running_dovecot(**modes)
