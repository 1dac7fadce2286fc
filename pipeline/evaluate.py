"""``python -m pipeline.evaluate --model DIR --prompts FILE|--reference SHARDS --steps N [N …] --guidance G [G …] --output DIR``

Text-to-image evaluation of an exported teacher or student: adherence on synthetic prompts,
FID / KID against reference images, CLIP score, diversity (precision / recall / density / coverage,
Vendi) in Inception and DINOv2 feature spaces, and guidance × steps sweeps with their
fidelity–diversity curves. The command is ``pipeline.evaluation.evaluate``.
"""

from __future__ import annotations

import sys

from pipeline.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
