#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, lints, then runs every test on both cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m ruff check src tests bench
python3 -m pytest -n 2 "$@"
