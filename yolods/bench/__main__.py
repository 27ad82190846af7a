"""`python -m yolods.bench`; see yolods/bench/cli.py and benchmarks/README.md."""

import sys

from yolods.bench.cli import main

sys.exit(main())
