"""What the browser tests of the portal share: starting a portal on loopback, a chromium per module, a fresh page
per test, screenshots and logging in.

Test modules import the helpers (`from portal_helpers import ...`) and bind the `browser` and `page` fixtures
under their own names (`browser, page = portal_helpers.browser, portal_helpers.page`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pyotp
import pytest
from helpers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("NCCID_TEST_OUTPUT", Path(__file__).parent / "output")) / "portal"
PASSWORD = "Quiet-Harbour-Lantern-7"
START_TIMEOUT = 30


class PortalUnderTest(Protocol):
    """A running portal as the tests know it: where it answers and the TOTP secret of each account that has one."""

    url: str
    totp: dict[str, str]


@contextlib.contextmanager
def running_portal(args: Sequence[str | Path], log: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run `python -m nccid.portal ARGS` on a free loopback port (output to `log`) and yield its base URL once
    /login answers; stop it by PID afterwards. Fails the test, showing the end of the log, if it does not start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "nccid.portal", *map(str, args), "--port", str(port), "--failure-delay", "0.01"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(url + "/login", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the portal did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright; one per test module."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A page in a fresh browser context (no cookies) for one test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def shot(page, name: str) -> None:
    """Save a full-page screenshot as SHOTS/NAME.png for a reviewer."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def login(page, portal: PortalUnderTest, username: str, password: str = PASSWORD, *, code: bool = True) -> None:
    """Log in through the login form; for an account with a TOTP secret also enter its current code (unless
    `code` is false, to leave the page at the code prompt)."""
    page.goto(portal.url + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("main form button[type=submit]")
    if code and username in portal.totp:
        page.wait_for_url("**/login/totp")
        page.fill("input[name=code]", pyotp.TOTP(portal.totp[username]).now())
        page.click("main form button[type=submit]")
    page.wait_for_load_state()
