"""``python -m pipeline.edit --model DIR --image IN.png [--mask M.png] [--strength S] [--prompt …] --output OUT.png``

Image-to-image, inpainting, outpainting, super-resolution and FlowEdit with an exported teacher
or student, without retraining. The command is ``pipeline.inference.edit_cli``.
"""

from __future__ import annotations

import sys

from pipeline.inference.edit_cli import main

if __name__ == "__main__":
    sys.exit(main())
