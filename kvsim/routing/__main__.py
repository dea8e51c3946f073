"""`python -m kvsim.routing ...`: the same as `kv-sim bench routing ...`."""

import sys

from kvsim.routing.cli import main

raise SystemExit(main(sys.argv[1:]))
