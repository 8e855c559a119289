"""`python -m benchmarks`: the benchmark suite (suite.py); `python -m benchmarks --help` lists its options."""

import sys
from pathlib import Path

# The benchmark modules import each other by their plain names, as when each is run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import main  # noqa: E402

sys.exit(main())
