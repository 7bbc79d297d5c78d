"""`python -m kallichore_trio` runs kcserver."""

from kallichore_trio.cli import main

raise SystemExit(main())
