"""The LLaDA recipe's model is the framework's text transformer (framework/nn/llada.py).

It lives in framework/ so the Hugging Face classes registered on `import framework` can wrap it; this
module keeps the recipe-local import path.
"""

from framework.nn.llada import KVCache, LladaModel, LladaModelConfig, count_parameters, train_flops_per_token

__all__ = ["KVCache", "LladaModel", "LladaModelConfig", "count_parameters", "train_flops_per_token"]
