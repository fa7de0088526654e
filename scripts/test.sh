#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, lints, then runs every test on both cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests drive for real:
#   dcmtk      the DICOM peers the site node is tested against (storescu, echoscu, dcmcjpeg, dcmcjpls; storescp
#              for bench/)
#   chromium   the browser the portal's pages are tested in (driven by Playwright; never `playwright install`)
#   bubblewrap the sandbox AI models run in during validation
missing=()
[ -x /usr/bin/storescu ] && [ -x /usr/bin/dcmcjpeg ] && [ -x /usr/bin/dcmcjpls ] || missing+=(dcmtk)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/bwrap ] || missing+=(bubblewrap)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m ruff check src tests bench examples
python3 -m pytest -n 2 "$@"
