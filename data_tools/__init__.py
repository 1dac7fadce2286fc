"""Dataset preprocessing command-line tools: synth, shard, inspect (and later encode)."""
