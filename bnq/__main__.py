"""`python -m bnq`: the `bnq` command."""

from bnq.cli import main

main()
