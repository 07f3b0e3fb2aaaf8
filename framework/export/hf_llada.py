"""transformers classes around `framework.nn.llada.LladaModel`, so an `--format hf` export loads with
`AutoModel` / `AutoModelForMaskedLM` / `AutoModelForCausalLM.from_pretrained(folder)` and no
`trust_remote_code`: `import framework` registers them with the Auto classes (framework/_hf_hook.py).

All three hold the LladaModel as `.model`, so one `model.safetensors` (keys `model.<our key>`) serves each;
the masked-diffusion LM is `LladaForMaskedLM`, the causal AR twin (`causal: true`) `LladaForCausalLM`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, MaskedLMOutput

from framework.diffusion.masked import shift_logits
from framework.export.hf_io import MODEL_TYPE
from framework.nn.layers import RMSNorm
from framework.nn.llada import LladaModel, LladaModelConfig
from framework.nn.rope import rope_frequencies


@strict
class LladaHFConfig(PretrainedConfig):
    """LladaModelConfig's fields under the same names (and defaults), plus the usual special token ids.

    `attribute_map` gives generic tooling the standard names (hidden_size, tie_word_embeddings, ...).
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "intermediate_size": "ffn_hidden", "max_position_embeddings": "max_seq_len",
                     "rms_norm_eps": "norm_eps", "initializer_range": "init_std",
                     "tie_word_embeddings": "tie_embeddings", "mask_token_id": "mask_id"}

    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0
    ffn_hidden: int = 683
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qkv_bias: bool = False  # q/k/v biases (an adapted Qwen2); exports written before it read as none
    tie_embeddings: bool = False
    mask_id: int = 4
    causal: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool | str = "none"  # none | full | every_k; older exports saved true/false
    activation_checkpointing_every: int = 2
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # > 0: a block-diffusion LM (objective.name=block_diffusion): attention is block-causal over blocks of this many
    # positions (a token sees its own block and earlier ones), as diffusers' LLaDA2Pipeline expects of its model.
    block_size: int = 0
    # True: a Dream-style model (objective.shift, adapted from an AR one): the network's output at position i predicts
    # token i + 1. `LladaForMaskedLM` returns its logits aligned with the tokens they predict (position j holds the
    # output at j - 1, position 0 its own), as our training and decoders read them; `AutoModel`'s hidden states are
    # per position, unshifted. Exports written before this field read as False, which they were.
    shift: bool = False

    def validate_architecture(self) -> None:
        self.model_config()  # LladaModelConfig's own checks (heads divide dim, even head_dim, mask id)

    def model_config(self) -> LladaModelConfig:
        return LladaModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LladaModelConfig)})

    @classmethod
    def from_model_config(cls, cfg: LladaModelConfig, **kwargs) -> LladaHFConfig:
        """The config of an export: `architectures` names the head that matches `causal`."""
        arch = LladaForCausalLM if cfg.causal else LladaForMaskedLM
        return cls(**dataclasses.asdict(cfg), architectures=[arch.__name__], **kwargs)


class LladaPreTrainedModel(PreTrainedModel):
    config_class = LladaHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # Only in effect when config.tie_word_embeddings (= tie_embeddings); the export then omits lm_head.
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: LladaHFConfig) -> None:
        super().__init__(config)
        self.model = LladaModel(config.model_config())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """LladaModel's own init; also what fills whatever from_pretrained did not load.

        from_pretrained builds on the meta device and then gives non-persistent buffers uninitialised
        memory, so the RoPE tables must be recomputed here (`init.*` skip tensors that were loaded).
        """
        std = self.config.init_std
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:  # q/k/v biases (qkv_bias) start at zero
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LladaModel):
            cfg = module.cfg
            cos, sin = rope_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, module.rope_cos.device)
            init.copy_(module.rope_cos, cos)
            init.copy_(module.rope_sin, sin)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        if self.config.block_size > 0:
            return self._block_hidden(input_ids, attention_mask, position_ids)
        # HF attention_mask: 1 = real token, as our key_padding_mask; all ones -> None keeps SDPA unmasked.
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        hidden, _ = self.model.hidden_states(input_ids, mask, positions=position_ids)
        return hidden

    def _block_hidden(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        """Block-causal attention, blocks by position (position_ids // block_size, as in training); padding keys
        (attention_mask 0) are never attended."""
        from framework.diffusion.block_diffusion import block_causal_mask, block_index, with_key_mask

        b, length = input_ids.shape
        positions = position_ids if position_ids is not None else \
            torch.arange(length, device=input_ids.device).expand(b, length)
        blocks = block_index(positions.to(input_ids.device), self.config.block_size)
        mask = with_key_mask(block_causal_mask(blocks, blocks), None if attention_mask is None else attention_mask.bool())
        hidden, _ = self.model.hidden_states(input_ids, positions=positions, attn_mask=mask)
        return hidden


class LladaHFModel(LladaPreTrainedModel):
    """`AutoModel`: the final-norm hidden states."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutput | tuple:
        hidden = self._hidden(input_ids, attention_mask, position_ids)
        return BaseModelOutput(last_hidden_state=hidden) if return_dict is not False else (hidden,)


class _LladaWithHead(LladaPreTrainedModel):
    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def _logits(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        return self.model.lm_head(self._hidden(input_ids, attention_mask, position_ids))


class LladaForMaskedLM(_LladaWithHead):
    """`AutoModelForMaskedLM`: the masked-diffusion LM; logits at every position (fill `<mask>` tokens).

    `logits[:, j]` always predict token j: with `config.shift` (a Dream-style model, whose output at i predicts
    token i + 1) they are the network's outputs moved one position right, so filling a `<mask>` at j reads
    `logits[:, j]` either way. `labels` (-100 = ignored) give the plain cross-entropy over the labelled positions,
    not the diffusion ELBO.
    """

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, return_dict: bool | None = None, **kwargs) -> MaskedLMOutput | tuple:
        logits = self._logits(input_ids, attention_mask, position_ids)
        if self.config.shift:  # aligned with the tokens they predict, as recipes/llada/objectives.diffusion_logits
            logits = shift_logits(logits)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)


class LladaForCausalLM(_LladaWithHead, GenerationMixin):
    """`AutoModelForCausalLM`: the autoregressive twin (`causal: true`); logits predict the next token.

    `labels` are shifted inside, as in transformers' causal LMs. `generate()` works without a KV cache: each
    step reruns the whole sequence (our own KVCache decoding lives in framework/diffusion/masked_decode.py).
    """

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      **kwargs) -> dict:
        # The full sequence every step (transformers would feed only the new token to a cached model);
        # left padding gets positions counted from each row's first real token, as in training.
        positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutput | tuple:
        logits = self._logits(input_ids, attention_mask, position_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutput(loss=loss, logits=logits)


def register() -> None:
    """Make the Auto classes know `framework_llada` (idempotent). Runs when this module is imported."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    AutoConfig.register(MODEL_TYPE, LladaHFConfig, exist_ok=True)
    AutoModel.register(LladaHFConfig, LladaHFModel, exist_ok=True)
    AutoModelForMaskedLM.register(LladaHFConfig, LladaForMaskedLM, exist_ok=True)
    AutoModelForCausalLM.register(LladaHFConfig, LladaForCausalLM, exist_ok=True)


register()  # importing this module registers: framework/_hf_hook.py imports it when transformers arrives
