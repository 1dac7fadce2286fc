"""``python -m pipeline.demo_report --run runs/demo``: the demo's report (``pipeline.reporting.demo_report``)."""

from __future__ import annotations

import sys

from pipeline.reporting.demo_report import main

if __name__ == "__main__":
    sys.exit(main())
