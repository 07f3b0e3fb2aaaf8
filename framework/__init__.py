"""Shared cores of the training framework: config, distributed, engine, trainer, checkpoints, data."""

from framework import _hf_hook

# Our transformers classes (AutoModel & co. for `--format hf` exports) register when transformers is
# imported, without importing it here: see framework/_hf_hook.py.
_hf_hook.install()
