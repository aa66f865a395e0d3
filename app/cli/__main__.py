"""`python -m app.cli ARGS`: the `tessera` command (the local farm starts its parts so)."""

from app.cli.main import main

raise SystemExit(main())
