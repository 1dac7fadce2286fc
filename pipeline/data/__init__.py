"""Shard readers: a resumable distributed batch stream, and decoders for image and latent shards."""
