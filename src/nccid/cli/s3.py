"""`nccid s3 ...`: the managed local S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import contextlib
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
    host: str = typer.Option(
        "127.0.0.1", "--host", "--bind", help="Address to listen on; loopback unless told otherwise."
    ),
    bucket: list[str] = typer.Option(["nccid-data-warehouse-prod"], "--bucket", help="Buckets to create."),
    sweep_interval: float = typer.Option(60.0, help="Seconds between checks for expired grants."),
) -> None:
    """Start SeaweedFS in the foreground and keep it running (restarted if it dies); Ctrl-C or SIGTERM stops it."""
    import signal
    import threading

    from nccid.s3server.seaweedfs import SeaweedFS
    from nccid.s3server.serve import serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] listening on {host}: reachable beyond this machine")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            SeaweedFS(home, bind=host, s3_port=port),
            buckets=bucket,
            stop=stop,
            sweep_interval=sweep_interval,
            report=lambda line: (console.print(line, soft_wrap=True, highlight=False), sys.stdout.flush()),
        )
    console.print("stopped")


@app.command("stop")
def s3_stop(home: Path = HomeOption) -> None:
    """Stop a server started with `nccid s3 serve` (by its PID)."""
    import signal
    import time

    from nccid.s3server.seaweedfs import alive

    srv = server(home)
    state = srv.state()
    if state is None:
        raise fail(f"no running server recorded in {home}")
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
