"""``python -m pipeline.compare --student DIR [--teacher DIR] [--guidance G [G …]] --output DIR``: a distilled
student against its teacher at 1/2/4/8 and 50 steps, at one guidance scale or along several
(``pipeline.evaluation.compare``)."""

from __future__ import annotations

import sys

from pipeline.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main())
