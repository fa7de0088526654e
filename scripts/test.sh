#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, lints, then runs every test on both cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# DCMTK: the real DICOM peers the site node is tested against (storescu, echoscu, dcmcjpeg, dcmcjpls; storescp for
# bench/)
if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/dcmcjpeg ] || [ ! -x /usr/bin/dcmcjpls ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m ruff check src tests bench
python3 -m pytest -n 2 "$@"
