"""``python -m pipeline.evaluate_edits --teacher DIR [--student DIR] --count 256 --output DIR``

Inpainting, image-to-image, outpainting and super-resolution measured on the synthetic set:
``edit_report.md/json`` and ``edit_sheet.png``. On request (``--tasks colourise,sr4,edges,deblur``
``[--l2 DIR] [--pix2pix DIR] [--conditioned DIR]``) the inverse problems too: per task the source,
the trained generators, SDEdit, the data-consistent solver, the conditioned model and the VAE
ceiling side by side (objects kept, colour right, PSNR, LPIPS, consistency error ‖A(x̂) − y‖) and
``sheet_TASK.png``. The command is ``pipeline.evaluation.edit_report``.
"""

from __future__ import annotations

import sys

from pipeline.evaluation.edit_report import main

if __name__ == "__main__":
    sys.exit(main())
