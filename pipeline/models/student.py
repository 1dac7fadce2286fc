"""The distillation student built from a trained teacher (Luo et al. 2023, "Latent Consistency
Models": a guidance-conditioned student that starts as the teacher).

The student is the teacher's DiT plus a guidance-scale embedding whose output layer starts at
zero, so at step 0 the student *is* the teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models.dit import DiT


def load_teacher(folder: Path):
    return DiT.from_pretrained(Path(folder) / "transformer").eval().requires_grad_(False)


def student_from(teacher) -> torch.nn.Module:
    """The teacher's architecture plus a guidance embedding whose output starts at zero."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = DiT(**{**config, "guidance_embed": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_embedder") for k in missing), (missing, unexpected)
    last = student.guidance_embedder.mlp[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return student


