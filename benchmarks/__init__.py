"""Ratio benchmarks: each module's ``run(quick) -> list[dict]`` compares variants in one run.

Every entry is ``{"name", "ratio", "goal", "better": "higher"|"lower", ...details}``.
"""

BENCHMARKS = ["benchmarks.shard_throughput", "benchmarks.latent_cache", "benchmarks.dit_vs_pixart", "benchmarks.sampling_speed", "benchmarks.loader_throughput", "benchmarks.lora_memory"]
