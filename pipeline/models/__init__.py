"""Model architectures (one device, no training code): the latent diffusion transformer."""

from .dit import DIT_CONFIGS, DiT, build_dit, compile_blocks, count_parameters, flops_per_sample

__all__ = ["DIT_CONFIGS", "DiT", "build_dit", "compile_blocks", "count_parameters", "flops_per_sample"]
