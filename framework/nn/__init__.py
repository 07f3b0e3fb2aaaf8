"""Shared neural-network layers: attention (flash-attn | SDPA), rotary embeddings, norms and MLPs."""
