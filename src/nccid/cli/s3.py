"""`nccid s3 ...`: the managed local S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from nccid.cli._common import HomeOption, fail, server
from nccid.console import console, err_console

app = typer.Typer(help="A managed local S3 server (SeaweedFS on loopback) for S3 mode.", no_args_is_help=True)


@app.command("serve")
def s3_serve(
    home: Path = HomeOption,
    port: int = typer.Option(8333, help="S3 port."),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback is your decision."),
    bucket: list[str] = typer.Option(["nccid-data-warehouse-prod"], "--bucket", help="Buckets to create."),
    sweep_interval: float = typer.Option(60.0, help="Seconds between checks for expired grants."),
) -> None:
    """Start SeaweedFS in the foreground; Ctrl-C (or SIGTERM) stops it cleanly."""
    import signal
    import threading

    from nccid.access.grants import Registry
    from nccid.store.s3 import S3Store
    from nccid.store.seaweedfs import SeaweedFS

    if bind not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] listening on {bind}: reachable beyond this machine")
    server = SeaweedFS(home, bind=bind, s3_port=port)
    state = server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        env = server.admin_env()
        for name in bucket:
            store = S3Store(name, endpoint_url=state.endpoint)
            os.environ.update(env)
            store.create_bucket()
        console.print(f"S3 ready at {state.endpoint} (SeaweedFS pid {state.weed_pid}), buckets: {', '.join(bucket)}")
        console.print(f"home: {server.home}; administrator environment: nccid s3 env --home {server.home}")
        console.print("ready", soft_wrap=True)
        sys.stdout.flush()
        registry = Registry(server)
        while not stop.wait(sweep_interval):
            for grant in registry.sweep():
                console.print(f"expired: {grant.access_key} ({grant.org}, {grant.group})")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        console.print("stopped")


@app.command("stop")
def s3_stop(home: Path = HomeOption) -> None:
    """Stop a server started with `nccid s3 serve` (by its PID)."""
    import signal
    import time

    from nccid.store.seaweedfs import alive

    srv = server(home)
    state = srv.state()
    if state is None:
        raise fail(RuntimeError(f"no running server recorded in {home}"))
    if state.supervisor_pid != os.getpid() and alive(state.supervisor_pid):
        os.kill(state.supervisor_pid, signal.SIGTERM)  # `nccid s3 serve` stops SeaweedFS and its audit receiver
        deadline = time.monotonic() + 30
        while alive(state.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if alive(state.weed_pid):
        srv.stop()
    console.print("stopped")


@app.command("env")
def s3_env(home: Path = HomeOption) -> None:
    """Print the administrator's environment (endpoint and key pair) as shell exports."""
    for name, value in server(home).admin_env().items():
        print(f"export {name}={value}")


