"""``python -m regproxy``: see L{regproxy.cli}."""

import sys

from .cli import main

sys.exit(main())
