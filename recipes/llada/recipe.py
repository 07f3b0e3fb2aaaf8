"""LLaDA-style masked diffusion language model: the recipe glue between model, data and trainer.

One recipe, four runs: masked-diffusion pretraining (data.kind=pretrain) or SFT (data.kind=sft), and
for each its autoregressive twin (model.causal=true, objective.name=autoregressive): the same
architecture, data, trainer and compute with a causal mask and next-token loss, for fair comparisons.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from framework import distributed as dist
from framework.config import ConfigError, RunConfig, to_dict
from framework.data.sft import SFTStream, exact_match
from framework.data.text import PackedTextStream
from framework.diffusion.masked import conditional_elbo, elbo_bits_per_token
from framework.nn.llada import LladaModel, LladaModelConfig, count_parameters, train_flops_per_token
from framework.recipe import Built, Recipe
from framework.rng import derive_seed
from recipes.llada import objectives, sample_quality
from recipes.llada.decoding import SampleConfig, block_decode_config, decode_config, generate_answers
from recipes.llada.tokenizer import (
    LLADA_MASK_TOKEN,
    TRANSFORMERS_TOKENIZER_FILES,
    TextTokenizer,
    adapt_tokenizer,
    save_adapted,
    sentencepiece_tokenizer,
    tokenizer_source,
    transformers_tokenizer,
)


@dataclass
class TextDataConfig:
    dir: str = "datasets/text"  # made by data/prepare_text.py (pretrain) or data/make_tasks.py (sft)
    kind: Literal["pretrain", "sft"] = "pretrain"  # packed token shards, or (prompt, response) SFT shards
    seq_len: int = 128
    doc_attention: bool = False  # attend only within a document (block-diagonal) instead of the whole pack
    max_skip_fraction: float = 0.1  # corrupt shards tolerated before the run stops
    # A transformers tokenizer folder for prompts, sampling, evaluation and the EOS/pad/mask ids; empty: data.dir's
    # sentencepiece tokenizer, or for a dataset without one train.init_from's LLaDA folder (recipes/llada/tokenizer.py)
    tokenizer: str = ""


@dataclass
class MaskedObjectiveConfig:
    name: Literal["masked", "autoregressive", "block_diffusion"] = "masked"  # autoregressive needs model.causal=true
    # block_diffusion (BD3-LM): blocks of this many positions, bidirectional inside, causal across (objectives.py)
    block_size: int = 0
    eps: float = 1e-3  # p_mask = (1 - eps) t + eps, so no row is left entirely unmasked
    antithetic: bool = False  # stratify t over the batch (lower-variance loss)
    random_length_prob: float = 0.01  # fraction of rows cropped to a random length (LLaDA: 1%; pretraining)
    elbo_samples: int = 8  # Monte Carlo samples per sequence of the held-out ELBO
    # Adapting an AR model (train.init_from=AR run or folder, model.causal=false); objectives.py says how.
    anneal_steps: int = 0  # attention mask causal -> bidirectional over this many optimizer steps (DiffuLLaMA); 0: off
    shift: bool = False  # position i's output predicts token i + 1 (Dream): training, ELBO and every decoder


@dataclass
class SFTConfig:
    supervise_padding: bool = True  # LLaDA: the EOS padding after an answer is supervised too
    normalize: Literal["answer_length", "token"] = "answer_length"  # per sample (LLaDA) or per token (SMDM)
    prompt_dropout: float = 0.0  # rows whose prompt is masked out: the unconditional model for CFG
    random_length: bool = False  # hide a random tail of each row's EOS padding (objectives.random_visible)


@dataclass
class LladaConfig(RunConfig):
    recipe: str = "llada"
    model: LladaModelConfig = field(default_factory=LladaModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    objective: MaskedObjectiveConfig = field(default_factory=MaskedObjectiveConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def run_tokenizer(cfg: LladaConfig) -> TextTokenizer:
    """The run's tokenizer (recipes/llada/tokenizer.py says which); ConfigError naming the key when there is none."""
    found = tokenizer_source(cfg.data.dir, cfg.data.tokenizer, cfg.train.init_from)
    if found is None:
        path = Path(cfg.data.dir) / "tokenizer.json"
        raise ConfigError(f"data.dir: no tokenizer at {path}; build the dataset first, e.g. "
                          f"`python data/prepare_text.py --out {cfg.data.dir}` or `python data/make_tasks.py --out "
                          f"{cfg.data.dir}`, or name a transformers tokenizer folder with data.tokenizer=FOLDER")
    kind, path = found
    if kind == "sentencepiece":
        return sentencepiece_tokenizer(path)
    key = "data.tokenizer" if cfg.data.tokenizer else "train.init_from"
    try:
        return transformers_tokenizer(adapted_tokenizer_dir(cfg) if kind == "adapted" else path)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def record_block_size(out_dir: str, block_size: int) -> None:
    """config.json of an `--format hf` export gets `block_size`: the model then attends block-causally."""
    path = Path(out_dir) / "config.json"
    raw = json.loads(path.read_text())
    raw["block_size"] = block_size
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def record_shift(out_dir: str, shift: bool) -> None:
    """config.json of an `--format hf` export gets `shift` (objective.shift): its output at i predicts token i + 1,
    and `LladaForMaskedLM` then returns logits aligned with the tokens they predict, as our decoders read them."""
    path = Path(out_dir) / "config.json"
    raw = json.loads(path.read_text())
    raw["shift"] = bool(shift)
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def prompt_room(cfg: LladaConfig) -> int:
    """The most prompt tokens a decode of sample.gen_length fits in model.max_seq_len (RoPE positions); block
    diffusion decodes whole blocks of objective.block_size, so its last block's tail must fit too."""
    block = cfg.objective.block_size if cfg.objective.name == "block_diffusion" else 1
    return cfg.model.max_seq_len // block * block - cfg.sample.gen_length


def too_long_prompt(cfg: LladaConfig, lengths: list[int], texts: list[str]) -> str | None:
    """A one-line reason when a prompt of these token counts cannot be decoded within model.max_seq_len, else None."""
    room = prompt_room(cfg)
    for n, text in zip(lengths, texts):
        if n > room:
            blocks = (f", in blocks of objective.block_size={cfg.objective.block_size}"
                      if cfg.objective.name == "block_diffusion" else "")
            return (f"sample.gen_length={cfg.sample.gen_length} + the prompt's {n} tokens ({text!r}) exceed "
                    f"model.max_seq_len={cfg.model.max_seq_len}{blocks}: lower sample.gen_length to at most "
                    f"{room + cfg.sample.gen_length - n}" + (f" or shorten the prompt to {room} tokens" if room > 0 else ""))
    return None


def will_evaluate(cfg: LladaConfig) -> bool:
    """Whether this run reaches an evaluation (eval.at_end, or an eval.every within train.steps): a short run of a
    preset whose sample prompts outgrow a small model's positions is not refused for an eval it never does."""
    return bool(cfg.eval.at_end or 0 < cfg.eval.every <= cfg.train.steps)


def fit_prompts(prompts: list[list[int]], room: int) -> tuple[list[list[int]], list[bool]]:
    """Prompts cut to their last `room` tokens (so every rank decodes as many rows as before) and which were cut."""
    cut = [len(p) > room for p in prompts]
    return [p[len(p) - room:] if c else p for p, c in zip(prompts, cut)], cut


def adapted_tokenizer_dir(cfg: LladaConfig) -> str:
    """RUN_DIR/tokenizer: train.init_from's Llama / Qwen2 tokenizer with the mask token, saved with the run."""
    from framework.export import hf_ar_io

    rows = hf_ar_io.read_raw_config(cfg.train.init_from)["vocab_size"]
    return str(save_adapted(cfg.train.init_from, rows, Path(cfg.run_dir) / "tokenizer"))


class LladaRecipe(Recipe):
    name = "llada"
    config_class = LladaConfig
    unit = "tokens"
    export_sections = ("model", "objective")  # objective.shift: how a user of the export reads its logits

    def validate(self, cfg: LladaConfig, world: int) -> None:
        adopt_llada_shape(cfg)
        adopt_ar_shape(cfg)
        m = cfg.model
        if cfg.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if m.dim % m.n_heads:
            raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
        if not 0 <= m.mask_id < m.vocab_size:
            raise ConfigError(f"model.mask_id={m.mask_id} is outside the vocabulary (model.vocab_size={m.vocab_size})")
        if (cfg.objective.name == "autoregressive") != m.causal:
            raise ConfigError(f"objective.name={cfg.objective.name} needs model.causal="
                              f"{str(cfg.objective.name == 'autoregressive').lower()} (the AR twin is causal, "
                              "the masked diffusion model bidirectional)")
        o = cfg.objective
        if (o.name == "block_diffusion") != (o.block_size > 0):
            raise ConfigError(f"objective.block_size={o.block_size}: objective.name=block_diffusion needs a block size "
                              f">= 1 and the other objectives none (got objective.name={o.name})")
        if o.name == "block_diffusion" and (o.anneal_steps or o.shift or cfg.sft.prompt_dropout):
            raise ConfigError("objective.name=block_diffusion trains and decodes without objective.anneal_steps, "
                              "objective.shift and sft.prompt_dropout (its decoder has no CFG): set them to 0/false")
        if o.anneal_steps < 0:
            raise ConfigError(f"objective.anneal_steps={o.anneal_steps} must be >= 0 (0: no annealing)")
        if (o.anneal_steps or o.shift) and (o.name == "autoregressive" or m.causal):
            raise ConfigError(f"objective.anneal_steps={o.anneal_steps} / objective.shift={o.shift} adapt an AR model "
                              "to masked diffusion: they need objective.name=masked and model.causal=false (got "
                              f"objective.name={o.name}, model.causal={str(m.causal).lower()})")
        if not 0.0 <= cfg.sft.prompt_dropout < 1.0:
            raise ConfigError(f"sft.prompt_dropout={cfg.sft.prompt_dropout} must lie in [0, 1)")
        if cfg.sample.batch_size < 1:
            raise ConfigError(f"sample.batch_size={cfg.sample.batch_size} must be >= 1")
        if cfg.sample.cfg_scale == 0.0 and not cfg.model.causal:
            # Configs saved before every recipe shared one CFG convention used 0 for "off"; it now ignores the prompt.
            print("warning: sample.cfg_scale=0 decodes unconditionally (the prompt masked out); guidance off is "
                  "sample.cfg_scale=1 (LLaDA's cfg_scale w is w + 1)", flush=True)
        try:
            if o.name == "block_diffusion":  # its own decoder: sample.block_length / cache do not apply
                block_decode_config(cfg.sample, o.block_size)
            else:
                decode_config(cfg.sample)
        except ValueError as e:
            raise ConfigError(f"sample.*: {e}") from None

    def tokenizer(self, cfg: LladaConfig) -> TextTokenizer:
        """The run's tokenizer, loaded once (a transformers folder takes seconds)."""
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = run_tokenizer(cfg)
        return self._tokenizer

    def check_tokenizer(self, cfg: LladaConfig) -> TextTokenizer:
        tok = self.tokenizer(cfg)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{tok.vocab_size} ({tok.source})")
        if tok.mask_id is None:
            raise ConfigError(f"{tok.source}: the tokenizer has no mask token (mask_token or {LLADA_MASK_TOKEN}); "
                              f"model.mask_id={cfg.model.mask_id} must be one")
        if tok.mask_id != cfg.model.mask_id:
            raise ConfigError(f"model.mask_id={cfg.model.mask_id} but the tokenizer's mask token id is "
                              f"{tok.mask_id} ({tok.source})")
        if tok.kind == "transformers":
            check_shard_ids(cfg, tok)
        return tok

    def describe(self, cfg: LladaConfig) -> str:
        n = count_parameters(cfg.model)
        f = train_flops_per_token(cfg.model, cfg.data.seq_len)
        kind = "autoregressive twin" if cfg.model.causal else \
            "block diffusion" if cfg.objective.name == "block_diffusion" else "masked diffusion"
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        return f"{size} parameters ({kind}, {cfg.data.kind}), {f / 1e9:.3f} GFLOPs per training token"

    def build_model(self, cfg: LladaConfig) -> Built:
        return Built(model=LladaModel(cfg.model))

    def build_data(self, cfg: LladaConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        self.check_tokenizer(cfg)
        if split == "train" and will_evaluate(cfg) and cfg.eval.samples > 0:
            self.check_sample_lengths(cfg, cfg.sample.prompts[: cfg.eval.samples])  # now, not at the first eval
            if cfg.data.kind == "sft" and prompt_room(cfg) < 1:  # held-out prompts are decoded for exact_match
                raise ConfigError(too_long_prompt(cfg, [1], ["a held-out prompt"]))
        if split == "train" and (cfg.eval.every or cfg.eval.at_end):
            self._stream(cfg, "val", rank, world, 1)  # a held-out set too small fails now, not after training
        return self._stream(cfg, split, rank, world, batch_multiple)

    def check_sample_lengths(self, cfg: LladaConfig, prompts: list[str]) -> None:
        """ConfigError (one line naming sample.gen_length, the prompt's token count and model.max_seq_len) when a
        prompt plus the generation would not fit the model's positions; launch/sample.py calls it before any model
        work, training when it builds its data."""
        tok = self.tokenizer(cfg)
        reason = too_long_prompt(cfg, [len(tok.encode_prompt(p)) for p in prompts], prompts)
        if reason:
            raise ConfigError(reason)

    def _stream(self, cfg: LladaConfig, split: str, rank: int, world: int, batch_multiple: int):
        micro = (cfg.eval.micro_batch or cfg.train.micro_batch) if split == "val" else cfg.train.micro_batch
        stream_class = SFTStream if cfg.data.kind == "sft" else PackedTextStream
        try:
            return stream_class(str(Path(cfg.data.dir) / split), seq_len=cfg.data.seq_len, micro_batch=micro,
                                rank=rank, world=world, seed=cfg.train.seed, batch_multiple=batch_multiple,
                                max_skip_fraction=cfg.data.max_skip_fraction)
        except (FileNotFoundError, ValueError) as e:
            key = "eval.micro_batch" if split == "val" else "train.micro_batch"
            raise ConfigError(f"data.dir ({split} split) / data.kind / data.seq_len / {key}: {e}") from e

    def loss(self, cfg: LladaConfig, model, helpers, batch, gen):
        if cfg.objective.name == "autoregressive":
            return objectives.autoregressive(cfg, model, batch, gen)
        if cfg.objective.name == "block_diffusion":
            return objectives.block_diffusion(cfg, model, batch, gen)
        if cfg.data.kind == "sft":
            return objectives.masked_sft(cfg, model, batch, gen)
        return objectives.masked_pretrain(cfg, model, batch, gen)

    def work(self, cfg: LladaConfig, batch: dict) -> tuple[float, float]:
        tokens = batch["input_ids"].numel()
        return float(tokens), tokens * train_flops_per_token(cfg.model, cfg.data.seq_len)

    def evaluate(self, cfg: LladaConfig, model, helpers, rank: int, world: int, step: int) -> dict:
        """Held-out likelihood on every rank's own val shards (masked: Monte Carlo ELBO, an upper bound;
        AR: the exact NLL), in bits per token (SFT: per supervised answer token); SFT also decodes
        eval.samples val prompts and reports their exact-match accuracy."""
        stream = self._stream(cfg, "val", rank, world, 1)
        batches = min(cfg.eval.batches, len(stream))
        gen = torch.Generator(device=dist.device()).manual_seed(derive_seed(cfg.train.seed, step, rank, 1 << 20))
        total, held_out = 0.0, []
        for _, batch in zip(range(batches), stream):
            batch = {k: v.to(dist.device()) for k, v in batch.items()}
            total += self._bits_per_token(model, cfg, batch, gen)
            held_out.append(batch)
        (bits,) = dist.all_reduce([total / max(1, batches)], op="mean")
        metrics = {"nll_bits_per_token" if cfg.model.causal else "elbo_bits_per_token": bits}
        if cfg.data.kind == "sft" and cfg.eval.samples > 0:
            metrics["exact_match"] = self._exact_match(model, cfg, held_out, world, gen)
        if cfg.data.kind == "pretrain" and cfg.eval.samples > 0:  # does generated text read? (sample_quality.py)
            self._scored = (step, *self._decode_samples(cfg, model, rank, world))  # sample() shows these
            metrics.update(sample_quality.summarize(self._scored[2]))
        return metrics

    def _bits_per_token(self, model, cfg: LladaConfig, batch: dict, gen: torch.Generator) -> float:
        ids = batch["input_ids"]
        if cfg.model.causal:
            loss, _ = objectives.autoregressive(cfg, model, batch, gen)
            return float(loss) / math.log(2.0)
        def logits(x):  # aligned with the tokens they predict (objective.shift)
            if cfg.objective.name == "block_diffusion":  # the same mask level in every block: each block's ELBO
                return objectives.block_logits(cfg, model, x, ids)
            return objectives.diffusion_logits(cfg, model, x)

        if cfg.data.kind != "sft":
            return float(elbo_bits_per_token(logits, ids, cfg.model.mask_id, gen, cfg.objective.elbo_samples))
        answer = objectives.sft_regions(batch, cfg.sft.supervise_padding)[1]
        nats, _ = conditional_elbo(logits, ids, answer, cfg.model.mask_id, gen, cfg.objective.elbo_samples)
        return float(nats.sum() / answer.sum()) / math.log(2.0)

    def _exact_match(self, model, cfg: LladaConfig, batches: list[dict], world: int, gen) -> float:
        """Fraction of this rank's first eval.samples // world held-out prompts answered exactly, over ranks."""
        prompts, references = [], []
        for batch in batches:
            for ids, p, a in zip(batch["input_ids"].tolist(), batch["prompt_len"].tolist(), batch["answer_len"].tolist()):
                prompts.append(ids[:p])
                references.append(ids[p:p + a - 1])
        share = max(1, cfg.eval.samples // world)
        # A held-out prompt too long for prompt + sample.gen_length <= model.max_seq_len is decoded cut (every rank
        # keeps its number of forwards, as ZeRO-3 needs) and counted wrong; the count is printed.
        prompts, cut = fit_prompts(prompts[:share], prompt_room(cfg))
        references = references[:share]
        tok = self.tokenizer(cfg)
        answers, _ = generate_answers(model, cfg, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                      device=dist.device(), lockstep=cfg.train.zero_stage == 3, gen=gen)
        # Compared as text up to whitespace (the tokenizer's decoding; a BPE may spell one text in two ways)
        right = sum(exact_match(tok.decode(a), tok.decode(r)) and not c for a, r, c in zip(answers, references, cut))
        right, count, too_long = dist.all_reduce([float(right), float(len(references)), float(sum(cut))], op="sum")
        if too_long and dist.is_main():
            print(f"warning: eval: {int(too_long)} of {int(count)} held-out prompts are longer than "
                  f"model.max_seq_len={cfg.model.max_seq_len} - sample.gen_length={cfg.sample.gen_length} tokens: "
                  "decoded cut and counted wrong in exact_match", flush=True)
        return right / max(count, 1.0)

    def sample(self, cfg: LladaConfig, model, helpers, rank: int, world: int, step: int, out_dir: str) -> list[str]:
        """Each rank decodes its share of the prompts (same number of forwards everywhere, for ZeRO-3);
        pretraining samples are printed with their sample_quality scores (those evaluate() just logged)."""
        scored = self.__dict__.pop("_scored", None)
        lines, scores = scored[1:] if scored and scored[0] == step else self._decode_samples(cfg, model, rank, world)
        if rank == 0 and lines:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "samples.txt").write_text("\n".join(lines) + "\n")
        return [sample_quality.annotate(line, score) for line, score in zip(lines, scores)] if scores else lines

    def _decode_samples(self, cfg: LladaConfig, model, rank: int, world: int) -> tuple[list[str], list[dict]]:
        """The sample prompts' lines "PROMPT ->TEXT" (on every rank) and, for pretraining runs whose train
        shards are at hand, each generated text's scores against the training words."""
        tok = self.tokenizer(cfg)
        prompts = cfg.sample.prompts[: max(cfg.eval.samples, 0)]
        mine = dist.split_work(prompts, rank, world)
        answers, _ = generate_answers(model, cfg, [tok.encode_prompt(p) for p in mine], eos_id=tok.eos_id,
                                      pad_id=tok.pad_id, device=dist.device(), lockstep=cfg.train.zero_stage == 3)
        done = dist.gather_work([(tok.decode(a), a) for a in answers], len(prompts), world)
        lines = [p + " ->" + text for p, (text, _) in zip(prompts, done)]
        # sample_quality reads the training words with data.dir's sentencepiece model
        if (cfg.data.kind != "pretrain" or tok.kind != "sentencepiece"
                or not (Path(cfg.data.dir) / "train" / "index.json").is_file()):
            return lines, []
        vocabulary = sample_quality.training_words(str(Path(cfg.data.dir).resolve()))
        return lines, [sample_quality.sample_scores(text, ids, vocabulary) for text, ids in done]

    def export_assets(self, cfg: LladaConfig, out_dir: str) -> list[str]:
        found = tokenizer_source(cfg.data.dir, cfg.data.tokenizer, cfg.train.init_from)
        if found and found[0] == "adapted":
            found = ("transformers", adapted_tokenizer_dir(cfg))
        folder = Path(found[1]) if found and found[0] == "transformers" else Path(cfg.data.dir)
        names = TRANSFORMERS_TOKENIZER_FILES if folder != Path(cfg.data.dir) else ("tokenizer.model", "tokenizer.json")
        copied = []
        for name in names:
            src = folder / name
            if src.is_file():
                shutil.copy(src, Path(out_dir) / name)
                copied.append(str(Path(out_dir) / name))
        return copied

    def export(self, state_dict: dict, cfg: LladaConfig, fmt: str, out_dir: str, source: dict | None = None) -> list[str]:
        """`--format hf`: a folder transformers loads after `import framework` (framework/export/hf_io.py),
        with a tokenizer converted from data.dir's sentencepiece model. `--format llada`: LLaDA's released
        layout (framework/export/llada_io.py), copying config, sharding and other files of train.init_from."""
        if fmt == "llada":
            return export_llada(state_dict, cfg, out_dir)
        if fmt != "hf":
            raise ConfigError(f"--format {fmt}: the llada recipe exports 'safetensors' or 'hf' (or 'llada', "
                              "LLaDA's released layout)")
        from framework.export import hf_io

        found = tokenizer_source(cfg.data.dir, cfg.data.tokenizer, cfg.train.init_from)
        if found and found[0] != "sentencepiece":  # a transformers tokenizer (an adapted one too): its own files
            written = hf_io.write(state_dict, cfg.model, out_dir, None, source) + self.export_assets(cfg, out_dir)
        else:
            tokenizer = Path(cfg.data.dir) / "tokenizer.model"
            if not tokenizer.is_file():
                print(f"warning: {tokenizer} not found: the export has no tokenizer", flush=True)
            written = hf_io.write(state_dict, cfg.model, out_dir, tokenizer if tokenizer.is_file() else None, source)
        if cfg.objective.name == "block_diffusion":  # the exported model attends block-causally (LLaDA2Pipeline)
            record_block_size(out_dir, cfg.objective.block_size)
        record_shift(out_dir, cfg.objective.shift)  # how its logits align (LladaHFConfig.shift)
        return written

    def initial_weights(self, cfg: LladaConfig, path: str) -> dict:
        """Also a Hugging Face folder (`--format hf`, or one transformers saved after fine-tuning). init_std and
        max_seq_len may differ from the source: they shape no weight (RoPE tables are recomputed)."""
        from framework.config import to_dict
        from framework.export import hf_io
        from framework.init_from import check_model_config, read_ours

        free = ("init_std", "max_seq_len", "activation_checkpointing")
        from framework.export import hf_ar_io, llada_io

        if hf_ar_io.is_ar_folder(path):  # validate() took the shape from config.json and the mask from the tokenizer
            state, found = hf_ar_io.read(path)
            if cfg.model.vocab_size == found.vocab_size + 1:  # the mask token took a new row (tokenizer.plan_mask)
                state = hf_ar_io.grow_vocab(state, cfg.model.vocab_size)
                found.vocab_size = cfg.model.vocab_size
            check_model_config(to_dict(cfg.model), to_dict(found), Path(path) / "config.json",
                               ignore=(*free, "mask_id", "causal"))
            return state
        if llada_io.is_llada_folder(path):  # validate() already took the model shape from its config.json
            state, found = llada_io.read(path)
            check_model_config(to_dict(cfg.model), to_dict(found), Path(path) / "config.json", ignore=free)
            return state  # in the file's dtype (bf16 for the release): copying into the model upcasts exactly
        if not hf_io.is_hf_folder(path):
            return read_ours(path, cfg, ignore=free)
        _, raw = hf_io.read_config(path)
        check_model_config(to_dict(cfg.model), raw, Path(path) / "config.json", ignore=free)
        return hf_io.read(path)[0]


def check_shard_ids(cfg: LladaConfig, tok: TextTokenizer) -> None:
    """SFT shards record the ids of the tokenizer that wrote them (data/sft_to_shards.py): they must be the run's."""
    index = Path(cfg.data.dir) / "train" / "index.json"
    try:
        recorded = json.loads(index.read_text()) if cfg.data.kind == "sft" else {}
    except (OSError, json.JSONDecodeError):
        return  # the stream reports a missing or broken index with its own message
    for key, ours in (("eos_id", tok.eos_id), ("mask_id", tok.mask_id), ("vocab_size", tok.vocab_size)):
        if key == "vocab_size" and recorded.get(key) == tok.base_vocab_size:
            continue  # written with the folder's tokenizer before its mask token was added: the same ids
        if recorded.get(key) is not None and recorded[key] != ours:
            raise ConfigError(f"{index} was tokenised with {key}={recorded[key]} (tokenizer "
                              f"{recorded.get('tokenizer')}) but the run's tokenizer {tok.source} has {ours}")


def adopt_llada_shape(cfg: LladaConfig) -> None:
    """`train.init_from` = a folder in LLaDA's released layout: the model's shape and mask id come from its
    config.json (never hand-copied; a preset's values are overwritten, with a note naming them). The run keeps
    max_seq_len, init_std, causal and activation_checkpointing, which shape no weight. `sample.confidence=auto`
    becomes "full" (LLaDA's generate.py) for such a folder, "without_mask" otherwise."""
    from framework.export import llada_io

    imported = bool(cfg.train.init_from) and llada_io.is_llada_folder(cfg.train.init_from)
    if cfg.sample.confidence == "auto":
        cfg.sample.confidence = "full" if imported else "without_mask"
    if not imported:
        return
    source = Path(cfg.train.init_from) / "config.json"
    try:
        found = llada_io.model_fields(llada_io.read_raw_config(cfg.train.init_from), source)
    except ValueError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    changed = [f"{k} {getattr(cfg.model, k)} -> {v}" for k, v in found.items() if getattr(cfg.model, k) != v]
    try:
        cfg.model = LladaModelConfig(**{**to_dict(cfg.model), **found})
    except ValueError as e:
        raise ConfigError(f"train.init_from: {source}: {e}") from None
    if changed and os.environ.get("RANK", "0") == "0":  # before dist.init: once per job, not per rank
        print(f"model config from {source}: {', '.join(changed)}", flush=True)


def adopt_ar_shape(cfg: LladaConfig) -> None:
    """`train.init_from` = a transformers Llama / Qwen2 folder: the model's shape comes from its config.json
    (hf_ar_io.model_fields, max_seq_len from max_position_embeddings) and its vocabulary size and mask id from
    the folder's tokenizer with a mask token (tokenizer.plan_mask: the tokenizer's own, a spare row, or one more
    row). Changes to the preset are printed, the mask id's too; `model.causal` stays the user's (false: masked
    diffusion)."""
    from framework.export import hf_ar_io

    raw = hf_ar_io.read_raw_config(cfg.train.init_from) if cfg.train.init_from else None
    if raw is None:
        return
    source = Path(cfg.train.init_from) / "config.json"
    try:
        found = hf_ar_io.model_fields(raw, source)
        tok, plan = adapt_tokenizer(cfg.train.init_from, found["vocab_size"])
    except ValueError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    # The folder decides the mask id as it decides the shape (a LLaDA folder does the same): a preset's value, e.g.
    # llada_8b_sft.yaml's LLaDA id, is replaced and the change printed, so one preset serves every source.
    found.update(vocab_size=plan.vocab_size, mask_id=plan.mask_id)
    changed = [f"{k} {getattr(cfg.model, k)} -> {v}" for k, v in found.items() if getattr(cfg.model, k) != v]
    try:
        cfg.model = LladaModelConfig(**{**to_dict(cfg.model), **found})
    except ValueError as e:
        raise ConfigError(f"train.init_from: {source}: {e}") from None
    if changed and os.environ.get("RANK", "0") == "0":  # before dist.init: once per job, not per rank
        row = "a spare embedding row" if plan.vocab_size == raw["vocab_size"] else "one more embedding row"
        print(f"model config from {source} and its tokenizer: {', '.join(changed)}"
              + (f" ({LLADA_MASK_TOKEN} added at id {plan.mask_id}: {row})" if plan.added else ""), flush=True)


def export_llada(state: dict, cfg: LladaConfig, out_dir: str) -> list[str]:
    """LLaDA's layout; with train.init_from a LLaDA folder, its config fields, shards and files are kept."""
    from framework.export import llada_io

    folder = cfg.train.init_from if cfg.train.init_from and llada_io.is_llada_folder(cfg.train.init_from) else None
    if folder is None:
        print("warning: train.init_from is no LLaDA folder: writing config.json and one model.safetensors only "
              "(add the release's modeling files to load it with trust_remote_code)", flush=True)
    try:
        written = llada_io.write(state, cfg.model, out_dir, folder)  # in the dtype launch/export.py cast to
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--format llada: {e}") from None
    found = tokenizer_source(cfg.data.dir, cfg.data.tokenizer, cfg.train.init_from)
    if folder is None and found and found[0] != "sentencepiece":  # e.g. an adapted Qwen2's, with its mask token
        written += LladaRecipe().export_assets(cfg, out_dir)
    return written
