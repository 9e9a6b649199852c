"""`python -m agent` is the same as the `vgw` console script."""

from agent.cli import main

raise SystemExit(main())
