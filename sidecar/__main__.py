"""``python -m sidecar``: the same as the ``sidecar`` console script."""

from sidecar.cli import main

main()
