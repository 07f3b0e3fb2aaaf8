"""Diffusion objectives and samplers as pure functions: gaussian, flow (rectified flow), masked (LLaDA)."""
