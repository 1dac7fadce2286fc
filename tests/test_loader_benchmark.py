"""``benchmarks.loader_throughput`` in quick mode: every entry is there with positive, finite figures."""

from __future__ import annotations

import math

import torch

from benchmarks import BENCHMARKS, loader_throughput

NAMES = {"loader_4_workers_vs_dit_b2_h100", "loader_4_workers_vs_dit_b2_h100_64x64", "loader_memory_32_vs_16_shard", "loader_http_vs_local",
         "loader_http_capped_4_vs_1_connections"}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def quotient_of(ratio: float, top: float, bottom: float) -> bool:
    """``ratio`` (rounded to 3 decimals) is top / bottom of the unrounded rates that the JSON prints
    rounded to 0.1: within the error that rounding carries into the quotient (a rate of ~80/s
    moves the quotient of ~6 by up to 0.004)."""
    slack = (top / bottom) * (0.05 / top + 0.05 / bottom) + 5e-4
    return abs(ratio - top / bottom) <= slack


def test_loader_benchmark_quick():
    threads = torch.get_num_threads()
    entries = {e["name"]: e for e in loader_throughput.run(quick=True)}
    assert torch.get_num_threads() == threads  # the suite's later tests keep their thread count
    assert set(entries) == NAMES
    assert "benchmarks.loader_throughput" in BENCHMARKS
    for name, e in entries.items():
        assert e["better"] in ("higher", "lower") and positive(e["goal"]), name
        assert positive(e["ratio"]), name
    for name in ("loader_4_workers_vs_dit_b2_h100", "loader_4_workers_vs_dit_b2_h100_64x64"):
        e = entries[name]
        for key in ("samples_per_s", "per_worker_samples_per_s", "peak_rss_mb"):
            assert set(e[key]) == {"0", "1", "2", "4"} and all(positive(v) for v in e[key].values()), (name, key)
        assert positive(e["dit_b2_h100_samples_per_s"]) and positive(e["one_core_per_worker_4_samples_per_s"])
        assert "989 TFLOP/s" in e["derivation"] and e["bytes_per_sample"] > 900_000  # ~1 MB a sample
    assert 2000 < entries["loader_4_workers_vs_dit_b2_h100"]["dit_b2_h100_samples_per_s"] < 3000
    memory = entries["loader_memory_32_vs_16_shard"]
    assert all(positive(memory[f"{k}_{s}"]) for k in ("peak_rss_mb", "peak_pss_mb") for s in (16, 32))
    http = entries["loader_http_vs_local"]
    assert len(http["local_rounds"]) == len(http["http_rounds"]) == http["rounds"]
    assert http["local_samples_per_s"] == sorted(http["local_rounds"])[len(http["local_rounds"]) // 2]  # the median
    assert quotient_of(http["ratio"], http["http_samples_per_s"], http["local_samples_per_s"])
    assert http["num_workers"] == min(2, http["cores_loader"]) and "sendfile" in http["server"]
    capped = entries["loader_http_capped_4_vs_1_connections"]
    assert quotient_of(capped["ratio"], capped["samples_per_s"]["4"], capped["samples_per_s"]["1"])
    assert capped["samples_per_s"]["1"] < 1.2 * capped["cap_mb_per_connection_s"] * 2**20 / capped["bytes_per_sample"]  # the cap holds
