"""Lets C{python -m pingated ...} behave exactly like the C{pingated} command."""

from pingated.cli import main

raise SystemExit(main())
