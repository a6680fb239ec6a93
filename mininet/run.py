#!/usr/bin/env python3
"""Run simulation scenarios on a Mininet fleet: `python mininet/run.py mininet/scenarios/X.yaml`.

A script, not a module: this directory has no __init__.py so that `import mininet` is always
the real Mininet. The library is the `fleet` package (docs/simulation.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: fleet, controller

from fleet.runner import main

if __name__ == "__main__":
    sys.exit(main())
