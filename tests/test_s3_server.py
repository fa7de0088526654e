"""`nccid s3 serve` as an administrator runs it: loopback only, grants by CLI, expiry on the running server,
a clean stop, and the data still there after a restart."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time

import boto3
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import run_cli


def _serve(home, env):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nccid.cli",
            "s3",
            "serve",
            "--home",
            str(home),
            "--port",
            "0",
            "--sweep-interval",
            "0.5",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        return proc, _read_until(proc, "ready", 90, whole_line=True)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


def _read_until(proc, marker: str, timeout: float, *, whole_line: bool = False) -> list[str]:
    """Lines the server prints until one contains `marker` (is it, with `whole_line`); fails the test if the
    server exits or the time is up first."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if (line.strip() == marker) if whole_line else (marker in line):
            return lines
    pytest.fail(f"no {marker!r} from nccid s3 serve: " + "".join(lines))


def _client(endpoint: str, access_key: str, secret: str):
    """An S3 client as a user would configure one from the printed credentials; no retries, so a refusal shows."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}),
    )


def _cli(*args, env):
    return run_cli(*args, env=env, check=True).stdout


def test_serve_grant_expire_stop_and_restart(tmp_path):
    home = tmp_path / "s3home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = "AKIAFROMSHELL", "shell-secret"  # must be ignored
    proc, _ = _serve(home, env)
    try:
        admin = dict(
            line.removeprefix("export ").split("=", 1)
            for line in _cli("s3", "env", "--home", home, env=env).splitlines()
        )
        state = __import__("json").loads((home / "server.json").read_text())
        weed_pid = state["weed_pid"]
        listening = {
            c.laddr.ip
            for p in [psutil.Process(weed_pid), *psutil.Process(weed_pid).children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {"127.0.0.1"}, listening
        s3 = _client(admin["AWS_ENDPOINT_URL"], admin["AWS_ACCESS_KEY_ID"], admin["AWS_SECRET_ACCESS_KEY"])
        s3.put_object(Bucket="nccid-data-warehouse-prod", Key="training/data/Covid1/data_2020-04-01.json", Body=b"{}")

        soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%S")
        out = _cli(
            "access", "grant", "Short Visit Lab", "--group", "training-all", "--expires", soon, "--home", home, env=env
        )
        creds = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("AWS_"))
        visitor = _client(admin["AWS_ENDPOINT_URL"], creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
        key = "training/data/Covid1/data_2020-04-01.json"
        assert visitor.get_object(Bucket="nccid-data-warehouse-prod", Key=key)["Body"].read() == b"{}"
        deadline = time.monotonic() + 30
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                visitor.get_object(Bucket="nccid-data-warehouse-prod", Key=key)
                time.sleep(0.5)
            except ClientError:
                refused = True
        assert refused, "the expired key still works"
        listing = _cli("access", "list", "--home", home, env=env)
        assert "Short Visit Lab" in listing and "expired" in listing
        assert creds["AWS_SECRET_ACCESS_KEY"] not in listing
        shell_key = _client(admin["AWS_ENDPOINT_URL"], "AKIAFROMSHELL", "shell-secret")
        with pytest.raises(ClientError):
            shell_key.list_objects_v2(Bucket="nccid-data-warehouse-prod")
    finally:
        _cli("s3", "stop", "--home", home, env=env)
        proc.wait(30)
    assert not psutil.pid_exists(weed_pid) or psutil.Process(weed_pid).status() == psutil.STATUS_ZOMBIE

    proc, _ = _serve(home, env)  # same home: same data, same administrator
    try:
        admin2 = dict(
            line.removeprefix("export ").split("=", 1)
            for line in _cli("s3", "env", "--home", home, env=env).splitlines()
        )
        assert admin2["AWS_ACCESS_KEY_ID"] == admin["AWS_ACCESS_KEY_ID"]
        s3 = _client(admin2["AWS_ENDPOINT_URL"], admin2["AWS_ACCESS_KEY_ID"], admin2["AWS_SECRET_ACCESS_KEY"])
        assert s3.get_object(Bucket="nccid-data-warehouse-prod", Key=key)["Body"].read() == b"{}"

        # SeaweedFS dies under the supervisor: it says so and brings it back on the same endpoint
        dead_pid = __import__("json").loads((home / "server.json").read_text())["weed_pid"]
        os.kill(dead_pid, signal.SIGKILL)
        lines = _read_until(proc, "S3 ready again", 90)
        assert any(f"SeaweedFS (pid {dead_pid}) died; restarting" in line for line in lines), lines
        new_pid = __import__("json").loads((home / "server.json").read_text())["weed_pid"]
        assert new_pid != dead_pid and psutil.pid_exists(new_pid)
        assert s3.get_object(Bucket="nccid-data-warehouse-prod", Key=key)["Body"].read() == b"{}"
    finally:
        _cli("s3", "stop", "--home", home, env=env)
        proc.wait(30)


def test_policy_export_and_clear_errors_from_the_access_commands(tmp_path):
    env = {**os.environ, "NCCID_S3_HOME": str(tmp_path / "home")}
    policy = __import__("json").loads(_cli("access", "policy", "uploader", "--uploader", "kings", env=env))
    assert policy["Statement"][0]["Resource"] == ["arn:aws:s3:::nccid-data-warehouse-prod/raw-kings/*"]
    for args, message in (
        (["access", "policy", "everything"], "unknown group"),
        (["access", "revoke", "NCCIDNOSUCHKEY"], "no grant with access key NCCIDNOSUCHKEY"),
        (["access", "grant", "Lab", "--group", "uploader"], "needs an uploader name"),
    ):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)


def test_watchdog_restarts_until_seaweedfs_dies_too_often():
    from nccid.s3server.serve import Watchdog

    dog = Watchdog(max_restarts=2, window_s=100.0)
    assert dog.may_restart(0.0) and dog.may_restart(10.0)
    assert not dog.may_restart(20.0)  # a third death within the window: give up (exit non-zero)
    assert dog.may_restart(150.0)  # the earlier deaths have left the window


def test_a_port_taken_between_picking_and_binding_is_picked_again(tmp_path, monkeypatch):
    """Another process may take a port SeaweedFS was given before it binds it: the start is retried elsewhere."""
    import socket

    from nccid.s3server import seaweedfs

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = seaweedfs.free_port
    calls = {"n": 0}

    def racing_free_port(bind: str = "127.0.0.1") -> int:
        calls["n"] += 1
        return taken if calls["n"] == 2 else real(bind)  # the first attempt's master port is already taken

    monkeypatch.setattr(seaweedfs, "free_port", racing_free_port)
    server = seaweedfs.SeaweedFS(tmp_path / "home")
    try:
        state = server.start()
        assert taken not in (state.master_port, state.s3_port) and calls["n"] > 9  # a second set of ports
        assert (tmp_path / "home" / "weed.log.0").exists()  # the failed attempt's log is kept beside
    finally:
        server.stop()
        squatter.close()
