"""Lets ``python -m benchmarks`` and ``scripts/bench`` share one entry point."""

import sys

from benchmarks.cli import main

sys.exit(main())
