"""Register our transformers classes (framework/export/hf_llada.py) once transformers is imported.

Every training process imports `framework`, and importing transformers costs seconds, so `import framework`
must not import it. Instead: if transformers is already imported, register now; otherwise a meta-path
finder wraps the loader of the `transformers` package so that registration runs right after the package
finished executing. Either import order then gives `AutoModel.from_pretrained(export)` our classes.
Standard library only; a failure to register warns and never breaks importing transformers.
"""

from __future__ import annotations

import sys
import warnings
from importlib.abc import MetaPathFinder


def register() -> None:
    """Register with the Auto classes (idempotent); warn instead of raising."""
    if "framework.export.hf_llada" in sys.modules:
        return  # imported, or being imported (it imports transformers itself): it registers at its end
    try:
        import framework.export.hf_llada  # noqa: F401  (registers on import)
    except Exception as e:  # a broken or too old transformers must not break the importer's own use of it
        warnings.warn(f"framework: could not register its Hugging Face classes ({type(e).__name__}: {e}); "
                      "AutoModel.from_pretrained on a framework export will not find them", stacklevel=2)


class _RegisterAfterTransformers(MetaPathFinder):
    """Finds `transformers` with the other finders and runs `register()` after its loader executed it."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as it would without us
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:  # done once; a failed import of transformers leaves us for the retry
                sys.meta_path.remove(self)
            register()

        loader.exec_module = exec_then_register  # this spec's loader instance only
        return spec


def install() -> None:
    """Called by `framework/__init__.py`: register now, or when transformers gets imported."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
