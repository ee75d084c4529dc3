"""`python -m prefopt ...` is the `prefopt` command."""

from .cli import main

main(prog_name="prefopt")
