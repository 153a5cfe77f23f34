"""``python -m lightning_gmc.plan``: see :mod:`lightning_gmc.plan.cli`."""

from lightning_gmc.plan.cli import main

raise SystemExit(main())
