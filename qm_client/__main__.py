"""``python -m qm_client`` runs the ``qm`` command line."""

from qm_client.cli import main

raise SystemExit(main())
