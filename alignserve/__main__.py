"""``python -m alignserve``: the same command line as ``alignserve`` (``alignserve.cli``)."""

from .cli import main

raise SystemExit(main())
