"""``python -m pipeline.evaluate_edits --teacher DIR [--student DIR] --count 256 --output DIR``

Inpainting, image-to-image, outpainting and super-resolution measured on the synthetic set:
``edit_report.md/json`` and ``edit_sheet.png``. The command is ``pipeline.evaluation.edit_report``.
"""

from __future__ import annotations

import sys

from pipeline.evaluation.edit_report import main

if __name__ == "__main__":
    sys.exit(main())
