"""Sparse autoencoders: training and loading through SAELens, feature statistics and examples,
and feature attribution (`sae_attr`)."""
