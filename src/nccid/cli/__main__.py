"""`python -m nccid.cli`: the same command as `nccid`."""

from nccid.cli import main

main()
