"""The site node as a service: worker processes on one port, signals, the sweeper, and nothing left behind.

`SiteNode` (nccid.site.node) is the Storage SCP of one process. `run_node` runs it as `nccid site node` does:

- with `workers` > 1, that many processes listen on one port (SO_REUSEPORT), forked before any thread starts;
- SIGINT or SIGTERM stops them all cleanly: listeners closed, held images released, spool emptied, no `.part`
  file left;
- workers die with their parent: each asks Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG) and also
  watches a pipe whose other end only the parent holds, so even `kill -9` of the main process leaves no worker
  serving the port (a new node would otherwise start beside the orphans);
- a sweeper thread in the main process releases held images whose clinical sheet has arrived and deletes spool
  files no association will finish (the associations delete their own as they end; this is the backstop).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from nccid.errors import NodeError, UsageError
from nccid.log import event
from nccid.site.node import (
    SiteNode,
    events_size,
    node_events,
    prepare_spool,
)
from nccid.site.outbox import Outbox

PR_SET_PDEATHSIG = 1
#: how long a worker whose parent died may take to stop cleanly before it exits regardless (seconds)
ORPHAN_GRACE = 10.0
SWEEP_EVERY = 2.0


def run_node(node: SiteNode) -> Counter:
    """Serve `node`'s configuration until SIGINT or SIGTERM, as `node.config.workers` processes on one port.

    Returns the outcomes of this run (filed / held / refused, from the event log, all workers together).
    Raises UsageError for several workers without a fixed port or for a malformed site settings file, OSError if
    the address cannot be bound, and NodeError if a worker process dies while serving (the others are stopped
    first).
    """
    config = node.config
    if config.workers > 1 and not config.port:
        raise UsageError("several node workers need a fixed port (--port), not 0")
    Path(config.outbox).mkdir(parents=True, exist_ok=True)
    Outbox(config.outbox).settings()  # a malformed settings file stops the node before any worker starts
    prepare_spool(config.spool)
    Outbox(config.outbox).discard_partial_writes()  # what a crashed run left
    offset = events_size(config.outbox)
    stop = threading.Event()
    parent_watch, parent_alive = os.pipe()  # workers see end-of-file on the read end when the parent is gone
    parent = os.getpid()
    children = [
        multiprocessing.get_context("fork").Process(
            target=_serve_worker, args=(node, parent, parent_watch, parent_alive), daemon=True
        )
        for _ in range(config.workers - 1)
    ]
    for child in children:
        child.start()
    os.close(parent_watch)
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    sweeper = threading.Thread(target=_sweep, args=(node, stop), name="nccid-node-sweeper", daemon=True)
    try:
        node.start(prepare=False)
        sweeper.start()
        while not stop.wait(0.5):
            if any(not c.is_alive() for c in children):
                raise NodeError("a node worker process died; the node stopped (start it again)")
    finally:
        stop.set()
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
        if sweeper.is_alive():
            sweeper.join(timeout=10)
        node.stop()
        Outbox(config.outbox).discard_partial_writes()
        os.close(parent_alive)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return Counter(e["outcome"] for e in node_events(config.outbox, offset))


def _serve_worker(node: SiteNode, parent: int, parent_watch: int, parent_alive: int) -> None:
    """A worker process: serve until told to stop or until the parent is gone, then stop without emptying the
    spool the other processes share."""
    os.close(parent_alive)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    die_with_parent(parent, parent_watch, stop)
    node.start(prepare=False)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        node.stop(clean_spool=False)


def die_with_parent(parent: int, parent_watch: int, stop: threading.Event) -> None:
    """Make this (forked) process stop when `parent` dies, however it dies.

    Two ways, as either alone can miss: Linux sends SIGTERM when the parent dies (PR_SET_PDEATHSIG; a no-op
    elsewhere), and a thread waits for end-of-file on `parent_watch` (the parent holds the pipe's only write
    end, which the kernel closes when it dies). Either sets `stop`; if the process has not exited
    `ORPHAN_GRACE` seconds later, it exits at once.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above was made
        os._exit(1)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(parent_watch, 1):
                pass
        if os.getppid() != parent or not stop.is_set():
            event("site.node.orphaned", pid=os.getpid())
        stop.set()
        time.sleep(ORPHAN_GRACE)
        os._exit(1)

    threading.Thread(target=watch, name="nccid-node-parent-watch", daemon=True).start()


def _sweep(node: SiteNode, stop: threading.Event) -> None:
    """Release held images whose sheet arrived, and delete spool files no association is still writing."""
    config = node.config
    outbox = Outbox(config.outbox)
    while not stop.wait(SWEEP_EVERY):
        try:
            outbox.release()
            cutoff = time.time() - (config.network_timeout + config.read_timeout)
            for entry in os.scandir(config.spool):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
        except OSError:
            continue
