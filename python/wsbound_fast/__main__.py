"""``python -m wsbound_fast``: the ``wsbound-fast`` command line."""

from ._cli import main

raise SystemExit(main())
