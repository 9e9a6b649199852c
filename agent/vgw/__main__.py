"""`python -m vgw` is the same as the `vgw` console script."""

from vgw.cli import main

raise SystemExit(main())
