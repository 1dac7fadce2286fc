"""A model's evaluation relative to the reference teacher's: adherence and speed ratios.

Plain arithmetic over evaluation summaries (``pipeline.evaluate``'s ``summary.json``), kept apart
from the code that generates them so the demo report reads its numbers without loading torch.
"""

from __future__ import annotations


def versus(entry: dict, teacher: dict) -> dict:
    """``entry``'s adherence and speed relative to the reference ``teacher`` (each an evaluation
    with ``adherence_all``, ``seconds_per_image`` and ``sampler_seconds_per_image``)."""
    return {
        "adherence_vs_teacher": entry["adherence_all"] / max(teacher["adherence_all"], 1e-9),
        "speedup_vs_teacher": teacher["seconds_per_image"] / max(entry["seconds_per_image"], 1e-12),
        "sampler_speedup_vs_teacher": teacher["sampler_seconds_per_image"] / max(entry["sampler_seconds_per_image"], 1e-12),
    }
