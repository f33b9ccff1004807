"""``python -m benchmarks.moba_bench <job> [--cases ...] [--tag T]``: see the package doc."""

import sys

from .cli import main

sys.exit(main())
