"""``python -m parity``: the same entry point as the ``parity`` command."""

from parity.cli import main

main()
