"""`python -m cachefeat ...` (also what `accelerate launch -m cachefeat ...` runs)."""

from cachefeat.cli import main

raise SystemExit(main())
