"""``python -m streams.cli``: the same as the ``liftstream`` command."""

from streams.cli.main import main

raise SystemExit(main())
