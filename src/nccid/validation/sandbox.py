"""Run a model's entry command in a bubblewrap sandbox: no network, read-only inputs and code, one writable
output folder, nothing else of the host, and limits on memory, processes and wall-clock time.

Why bubblewrap (Debian's `bubblewrap`): it is the small, audited sandbox Flatpak relies on; it needs no daemon
and no image build, starts in milliseconds (the benchmark measures the overhead), and builds the sandbox's file
system from nothing, so only what is bound exists inside: `/usr` and the Python installation (read-only), the
model at `/model` and the cohort at `/input` (read-only), `/output` (writable), and private `/tmp`, `/proc` and
`/dev`. It unshares the network (only a loopback with nothing listening), PID, IPC, UTS and cgroup namespaces,
and dies with its parent. Home, keys, vault, store credentials and ground truth are simply absent.

Limits: RLIMIT_AS (memory), RLIMIT_NPROC (processes) and RLIMIT_FSIZE (file size) are set before bubblewrap
starts and inherited. The kernel does not apply RLIMIT_NPROC to root, so when the harness runs as root the
command is started as `nobody` inside the sandbox (`setpriv`, with no capabilities and no-new-privs); as
another user, bubblewrap also unshares the user namespace. The wall clock is enforced by killing the whole
process group; the PID namespace takes every descendant with it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nccid.errors import SandboxError

NOBODY = 65534
BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"
LOG_TAIL = 16_384  # bytes of stdout / stderr kept for the vendor's dry-run log


@dataclass(frozen=True)
class Limits:
    """What a run may use. Stated in every report so that a run can be reproduced."""

    memory_mb: int = 2048  # address space (RLIMIT_AS)
    processes: int = 64  # processes and threads of the sandbox's user (RLIMIT_NPROC)
    wall_seconds: float = 600.0  # then the process group is killed
    output_mb: int = 64  # largest file the model may write (RLIMIT_FSIZE), and the size of its /tmp

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SandboxResult:
    """How the entry command ended. `status`: completed (exit 0), failed (non-zero exit or killed by a signal,
    such as a limit), or timed_out (killed at the wall-clock limit)."""

    status: str
    exit_code: int | None
    seconds: float
    stdout: str  # the last LOG_TAIL bytes, for the dry run's vendor-visible log
    stderr: str

    def describe(self) -> str:
        """How the run ended, in words for a log or a report: completed, timed out, killed by a signal, or failed."""
        if self.status == "completed":
            return f"completed in {self.seconds:.1f} s"
        if self.status == "timed_out":
            return f"stopped at the wall-clock limit after {self.seconds:.1f} s"
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by signal {-self.exit_code} after {self.seconds:.1f} s"
        return f"failed with exit code {self.exit_code} after {self.seconds:.1f} s"

    def to_json(self, *, with_logs: bool = False) -> dict:
        data = asdict(self)
        if not with_logs:
            data.pop("stdout")
            data.pop("stderr")
        return data


def python_roots() -> list[str]:
    """The folders of this Python installation a model's `python3` needs (bound read-only at the same path)."""
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
    roots = {r for r in roots if not r.startswith("/usr/") and r != "/usr"}
    return sorted(roots)


def check_available() -> None:
    """Raise SandboxError unless bubblewrap (and, as root, setpriv) can be used here."""
    if not os.access(BWRAP, os.X_OK):
        raise SandboxError(f"{BWRAP} not found: install Debian's bubblewrap (apt-get install -y bubblewrap)")
    if os.geteuid() == 0 and not os.access(SETPRIV, os.X_OK):
        raise SandboxError(f"{SETPRIV} not found: install util-linux")


def bwrap_command(
    entry: list[str] | tuple[str, ...], model: Path, inputs: Path, output: Path, tmp_mb: int = 64
) -> list[str]:
    """The bubblewrap command line that runs `entry` in /model with /input, /output and nothing else; /tmp is a
    private tmpfs of at most `tmp_mb` MB (it lives in memory)."""
    path = ":".join([*(f"{r}/bin" for r in python_roots()), "/usr/local/bin", "/usr/bin", "/bin"])
    command = [BWRAP, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        command.append("--unshare-user")
    command += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
        if target:
            command += ["--symlink", target, f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            command += ["--ro-bind", f"/{link}", f"/{link}"]
    made = set()
    for root in python_roots():
        # bubblewrap makes a bound path's parents with the host's modes (/root is 0700): open them to `nobody`
        parts = Path(root).parts
        for depth in range(2, len(parts)):
            parent = str(Path(*parts[:depth]))
            if parent not in made:
                made.add(parent)
                command += ["--perms", "0755", "--dir", parent]
        command += ["--ro-bind", root, root]
    command += [
        "--ro-bind", str(model), "/model",
        "--ro-bind", str(inputs), "/input",
        "--bind", str(output), "/output",
        "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
        "--clearenv",
        "--setenv", "PATH", path,
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "NCCID_INPUT", "/input",
        "--setenv", "NCCID_OUTPUT", "/output",
        "--setenv", "OMP_NUM_THREADS", "1",
        "--setenv", "OPENBLAS_NUM_THREADS", "1",
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--chdir", "/model",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command += [
            SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
        ]  # fmt: skip
    return [*command, *entry]


def _limit(limits: Limits):
    def apply() -> None:
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.output_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        processes = limits.processes
        if os.geteuid() != 0:  # the limit counts every process of the user: leave room for those running
            processes += sum(1 for p in os.listdir("/proc") if p.isdigit())
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))

    return apply


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - LOG_TAIL))
        return handle.read().decode("utf-8", "replace")


def prepare_output(output: Path) -> None:
    """An empty output folder the sandbox's user (nobody, when we are root) may write."""
    output.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(output, NOBODY, NOBODY)


def run_sandboxed(
    entry: list[str] | tuple[str, ...], model: Path, inputs: Path, output: Path, logs: Path, limits: Limits
) -> SandboxResult:
    """Run `entry` (argv, in /model) in the sandbox; stdout and stderr go to `logs`/{stdout,stderr}.txt.

    `output` must exist (see prepare_output). Returns how the command ended; never raises for the model's
    own failures. Raises SandboxError when bubblewrap cannot be used at all.
    """
    check_available()
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    status_read, status_write = os.pipe()  # bubblewrap reports the command's exit here (not seen inside)
    command = bwrap_command(entry, model.resolve(), inputs.resolve(), output.resolve(), limits.output_mb)
    command[1:1] = ["--json-status-fd", str(status_write)]
    start = time.monotonic()
    try:
        with open(out_path, "wb") as stdout, open(err_path, "wb") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_limit(limits),
                pass_fds=(status_write,),
            )
            os.close(status_write)
            timed_out = not _ended_within(process, limits.wall_seconds)
            _kill_group(process.pid)  # at the limit: the command; else anything it left behind in its group
            code = process.wait()
        os.set_blocking(status_read, False)
        try:
            status = os.read(status_read, 65536).decode(errors="replace")
        except BlockingIOError:
            status = ""
    finally:
        os.close(status_read)
    seconds = time.monotonic() - start
    stderr_text = _tail(err_path)
    if not timed_out and '"exit-code"' not in status:  # bubblewrap stopped before the command ran
        first = next((line for line in stderr_text.splitlines() if line.startswith("bwrap:")), stderr_text[:200])
        raise SandboxError(f"the sandbox could not start: {first.strip()}")
    status = "timed_out" if timed_out else ("completed" if code == 0 else "failed")
    return SandboxResult(status, None if timed_out else code, round(seconds, 3), _tail(out_path), stderr_text)


def _ended_within(process: subprocess.Popen, seconds: float) -> bool:
    """Wait up to `seconds` for `process` to end; returns whether it did (it is not reaped). A pidfd wakes us the
    moment it ends: Popen.wait(timeout) polls with sleeps of up to 50 ms, a delay added to every run."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # an old kernel
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], seconds)
    finally:
        os.close(pidfd)
    return bool(ready)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_direct(entry: list[str] | tuple[str, ...], model: Path, inputs: Path, output: Path) -> float:
    """Run `entry` in `model` without a sandbox, reading `inputs` and writing `output` (for the benchmark's
    baseline only: a validation run never does this). Returns the seconds taken; raises CalledProcessError."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/tmp",
        "NCCID_INPUT": str(inputs),
        "NCCID_OUTPUT": str(output),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    start = time.monotonic()
    subprocess.run(list(entry), cwd=model, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def remove_tree(path: Path) -> None:
    """Delete a folder the harness made read-only (a cohort's inputs) or the sandbox's user filled. Entries that
    another process deletes at the same time are no error; raises OSError if the folder cannot be deleted."""
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(os.path.join(root, name), 0o700)
    try:
        path.chmod(0o700)
    except FileNotFoundError:
        return

    def gone_meanwhile(_function, _name, info) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    shutil.rmtree(path, onerror=gone_meanwhile)
