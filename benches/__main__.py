"""``python -m benches``: the one benchmark runner (see ``benches/runner.py``)."""

import sys

from benches.runner import main

sys.exit(main())
