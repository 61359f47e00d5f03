"""``python -m qm_client`` runs the ``qm`` command line."""

from qm_client._cli_entry import main

raise SystemExit(main())
