"""`python -m nccid.portal --store DIR [--port N] ...`: the portal without the `nccid` command (tests, services).

The same options as `nccid portal serve`; see `nccid.portal.app.serve`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nccid.portal.app import serve
from nccid.portal.settings import PortalSettings, default_state_dir


def main(argv: list[str] | None = None) -> None:
    """Parse the portal options from `argv` (default: the command line) and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m nccid.portal", description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--catalog", type=Path)
    parser.add_argument("--vault", type=Path)
    parser.add_argument("--key-file", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--secure-cookies", action="store_true")
    parser.add_argument("--idle-timeout", type=int, default=30 * 60)
    parser.add_argument("--failure-delay", type=float, default=0.5)
    args = parser.parse_args(argv)
    settings = PortalSettings(
        store_url=args.store,
        state_dir=args.state or default_state_dir(args.store),
        catalog_path=args.catalog,
        vault_path=args.vault,
        key_file=args.key_file,
        secure_cookies=args.secure_cookies,
        idle_timeout_s=args.idle_timeout,
        failure_delay_s=args.failure_delay,
    )
    serve(settings, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
