"""Latent-diffusion training pipeline: configs, data, models, training, distillation, evaluation."""
