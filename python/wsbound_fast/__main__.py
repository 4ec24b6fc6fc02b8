"""``python -m wsbound_fast``: the ``wsbound-fast`` command line."""

from ._cli.main import main

raise SystemExit(main())
