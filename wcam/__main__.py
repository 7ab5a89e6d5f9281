"""``python -m wcam``: the same command line as the ``wcam`` script."""

from wcam.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
