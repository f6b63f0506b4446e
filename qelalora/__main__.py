"""`python -m qelalora` = the `qelalora` command."""

from .cli import main

main()
