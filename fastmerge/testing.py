"""Generate LLaMA-shaped checkpoint families on disk (no downloads): used by the demo, tests and benches.

Tensors are written one at a time with fastmerge's own streaming writer, so generating a multi-GB
family needs no more memory than its largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Sequence

import torch

from ._lazy import torch_dtype
from .io.writer import OutTensor, ShardWriter, plan_shards



@dataclasses.dataclass(frozen=True)
class LlamaShape:
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    vocab: int = 2000
    heads: int = 8
    kv_heads: int | None = None
    tie_embeddings: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order transformers saves a LlamaForCausalLM."""
        h, i = self.hidden, self.intermediate
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    @property
    def numel(self) -> int:
        n = 0
        for _, s in self.tensors():
            k = 1
            for d in s:
                k *= d
            n += k
        return n

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads or self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.02


class _Coalesced:
    """A ShardWriter's ``write``, consecutive tensors of less than ``limit`` bytes gathered into one ``write_run``.

    As a download writes a checkpoint (in chunks of MBs), not a file write per tensor: a MoE family's 20k tensors of
    4-16 KB written one by one took ~40 us each, and left them in the page cache as small folios, whose mapping and
    dropping cost the merges that read them more per byte (moe-16k: 0.062 against 0.041 s dropping the same pages
    of a copy written in 64 MB chunks)."""

    def __init__(self, writer: ShardWriter, limit: int = 8 << 20):
        self.writer, self.limit = writer, limit
        self.names: list[str] = []
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel() * tensor.element_size() >= self.limit:
            self.flush()
            self.writer.write(name, tensor)  # (checks dtype and shape; a run's bytes are checked by their sum)
            return
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if self.size + len(data) > self.limit:
            self.flush()
        self.names.append(name)
        self.parts.append(data)
        self.size += len(data)

    def flush(self) -> None:
        if self.names:
            self.writer.write_run(self.names, memoryview(b"".join(self.parts)))
            self.names, self.parts, self.size = [], [], 0

    def finalize(self) -> None:
        self.flush()
        self.writer.finalize()


def write_model(
    out: Path, shape: LlamaShape, dtype: str, shard_bytes: int, seed: int, base_seed: int | None = None,
    noise: float = 0.002, tokens: Sequence[str] | None = None, fp8_block: tuple[int, int] | None = None,
) -> Path:
    """Write one model. With ``base_seed`` it is a "fine-tune": the base (regenerated from ``base_seed``)
    plus N(0, noise²) and, on 1% of entries, larger task-specific changes (so TIES has signal to keep).

    With ``tokens`` (token of id i = ``tokens[i]``), the embedding and lm_head rows are drawn per token
    (``_token_rows``), so models whose tokenizers number the same token differently still agree on its
    row; rows beyond ``len(tokens)`` (``shape.vocab`` larger) are padding rows of their own.

    ``fp8_block`` (e.g. (128, 128)): an FP8 checkpoint in DeepSeek-V3's layout: every weight
    ``fp8_quantized`` picks stored as F8_E4M3 with its fp32 ``<name>_scale_inv`` per block beside it
    (``io.fp8.quantize_blocks``), the rest in ``dtype``; ``config.json`` declares the ``quantization_config``."""
    out.mkdir(parents=True, exist_ok=True)
    dt = torch_dtype(dtype)
    specs = shape.tensors()
    layout: list[OutTensor] = []
    for n, s in specs:
        if fp8_block is not None and fp8_quantized(n, s):
            layout += [OutTensor(n, "float8_e4m3fn", s),
                       OutTensor(n + "_scale_inv", "float32", (-(-s[0] // fp8_block[0]), -(-s[1] // fp8_block[1])))]
        else:
            layout.append(OutTensor(n, dtype, s))
    shards = plan_shards(layout, shard_bytes)
    w = _Coalesced(ShardWriter(out, shards))
    for k, (name, s) in enumerate(specs):
        if tokens is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
            w.write(name, _token_rows(name, tokens, s, seed, base_seed, noise).to(dt).contiguous())
            continue
        g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed) * 100_003 + k)
        t = _base_tensor(name, s, g)
        if base_seed is not None:
            g2 = torch.Generator().manual_seed(seed * 100_003 + k)
            t = t + noise * torch.randn(s, generator=g2)
            spikes = torch.rand(s, generator=g2) < 0.01
            t = t + spikes * (10 * noise) * torch.randn(s, generator=g2)
        if fp8_block is not None and fp8_quantized(name, s):
            from .io.fp8 import quantize_blocks

            q, scale = quantize_blocks(t, fp8_block)
            w.write(name, q.contiguous())
            w.write(name + "_scale_inv", scale.contiguous())
            continue
        w.write(name, t.to(dt).contiguous())
    w.finalize()
    cfg = shape.config(dtype)
    if fp8_block is not None:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(fp8_block)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}))
    return out


#: weights an FP8 checkpoint keeps in bf16 (DeepSeek-V3's and Qwen3-FP8's choice): embeddings, heads, norms, routers
FP8_KEEP = ("embed", "lm_head", "norm", "mlp.gate.", "e_score_correction_bias")


def fp8_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether an FP8 checkpoint of this family stores ``name`` in FP8: the 2-D projection weights."""
    return len(shape) == 2 and name.endswith(".weight") and not any(k in name for k in FP8_KEEP)


def _token_rows(name: str, tokens: Sequence[str], shape: tuple[int, ...], seed: int, base_seed: int | None,
                noise: float) -> torch.Tensor:
    """Rows of a vocabulary tensor, one generator per (tensor, token): the base row of token ``tok``
    depends only on (base seed, name, tok); a fine-tune adds its own N(0, noise²) + 1% spikes."""
    rows, hidden = shape
    out = torch.empty(shape)
    root = base_seed if base_seed is not None else seed
    for i in range(rows):
        key = tokens[i] if i < len(tokens) else f"<row {i}>"
        g = torch.Generator().manual_seed(zlib.crc32(f"{root}|{name}|{key}".encode()))
        r = torch.randn(hidden, generator=g) * 0.02
        if base_seed is not None:
            g2 = torch.Generator().manual_seed(zlib.crc32(f"{seed}|ft|{name}|{key}".encode()))
            r = r + noise * torch.randn(hidden, generator=g2)
            r = r + (torch.rand(hidden, generator=g2) < 0.01) * (10 * noise) * torch.randn(hidden, generator=g2)
        out[i] = r
    return out


def vocab_tokens(n: int, kind: str = "wordlevel", specials: Sequence[str] = ("<unk>", "<s>", "</s>")) -> list[str]:
    """``n`` distinct tokens, the specials first. ``wordlevel``: ``t0, t1, ...``; ``bpe``: single letters,
    then letter pairs ``aa, ab, ...`` (so BPE merges exist), then triples."""
    out = list(specials)
    if kind == "wordlevel":
        i = 0
        while len(out) < n:
            out.append(f"t{i}")
            i += 1
        return out[:n]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pool = list(letters) + [a + b for a in letters for b in letters] + [a + b + c for a in letters for b in letters for c in letters]
    return (out + pool)[:n]


def write_tokenizer(
    out: Path, tokens: Sequence[str], kind: str = "wordlevel", n_added: int = 0,
    special: dict[str, str] | None = None, unk: str | None = "<unk>",
) -> Path:
    """A Hugging Face fast tokenizer in ``out``: ``vocab.json`` (WordLevel or BPE model) where
    ``tokens[i]`` has id i, the last ``n_added`` of them as added tokens (not in the model vocabulary),
    and ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, special tokens from ``special``, default
    bos ``<s>`` / eos ``</s>`` / unk ``<unk>`` when present). Loads offline with transformers."""
    out.mkdir(parents=True, exist_ok=True)
    n_model = len(tokens) - n_added
    vocab = {t: i for i, t in enumerate(tokens[:n_model])}
    specials = {"<unk>", "<s>", "</s>", "<pad>"}
    added = [
        {"id": n_model + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t in specials}
        for k, t in enumerate(tokens[n_model:])
    ] + [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t in tokens[:n_model] if t in specials
    ]
    if kind == "wordlevel":
        model: dict = {"type": "WordLevel", "vocab": vocab, "unk_token": unk if unk in vocab else None}
        pre = {"type": "Whitespace"}
    elif kind == "bpe":
        merges = [[t[:-1], t[-1]] for t in tokens[:n_model] if len(t) >= 2 and not t.startswith("<")
                  and t[:-1] in vocab and t[-1] in vocab]
        model = {"type": "BPE", "dropout": None, "unk_token": unk if unk in vocab else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                 "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges}
        pre = {"type": "Whitespace"}
    else:
        raise ValueError(f"kind must be 'wordlevel' or 'bpe', got {kind!r}")
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": pre, "post_processor": None, "decoder": None, "model": model}
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    if special is None:
        special = {k: v for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")) if v in tokens}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return out


def make_vocab_family(
    root: Path, shape: LlamaShape, vocabs: dict[str, Sequence[str]], dtype: str = "bfloat16",
    kind: str = "wordlevel", shard_bytes: int = 20_000_000, seed: int = 0, rows: dict[str, int] | None = None,
    n_added: dict[str, int] | None = None,
) -> dict[str, Path]:
    """Models under ``root/<name>`` with their own tokenizers: the first entry of ``vocabs`` is the base,
    the others fine-tunes of it. Each gets ``shape`` with ``vocab`` = ``rows[name]`` (default: its number
    of tokens) and per-token embedding / lm_head rows (see ``write_model``). Returns {name: folder}."""
    out: dict[str, Path] = {}
    for i, (name, toks) in enumerate(vocabs.items()):
        n = (rows or {}).get(name, len(toks))
        sh = dataclasses.replace(shape, vocab=n)
        p = write_model(root / name, sh, dtype, shard_bytes, seed + i, base_seed=None if i == 0 else seed, tokens=toks)
        write_tokenizer(p, toks, kind, n_added=(n_added or {}).get(name, 0))
        out[name] = p
    return out


def make_family(
    root: Path, shape: LlamaShape = LlamaShape(), n_finetunes: int = 3, dtype: str = "bfloat16",
    shard_bytes: int = 20_000_000, seed: int = 0, workers: int = 1, fp8_block: tuple[int, int] | None = None,
) -> tuple[Path, list[Path]]:
    """base + ``n_finetunes`` fine-tunes under ``root`` (``base/``, ``ft1/``...). Returns (base, fine-tunes).

    ``workers`` > 1 writes the models in that many processes at once (the same bytes: each model is a
    function of its seeds alone): torch draws a seeded generator's numbers on one core, so a 1B-parameter
    family (13.8G draws) takes minutes serially on a many-core GPU machine."""
    jobs = [(root / "base", shape, dtype, shard_bytes, seed, None, fp8_block)] + [
        (root / f"ft{i + 1}", shape, dtype, shard_bytes, seed + i + 1, seed, fp8_block) for i in range(n_finetunes)
    ]
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        # spawn, not fork: the caller may hold threads (CUDA, OpenMP) that a forked child must not inherit
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
            paths = list(ex.map(_write_job, jobs))
    else:
        paths = [_write_job(j) for j in jobs]
    return paths[0], paths[1:]


def _write_job(job: tuple) -> Path:
    out, shape, dtype, shard_bytes, seed, base_seed, fp8_block = job
    return write_model(out, shape, dtype, shard_bytes, seed, base_seed=base_seed, fp8_block=fp8_block)


# ------------------------------------------------------------------------------------------------
# MoE families: the real expert counts and expert shapes by default; fewer layers (and, for tests,
# smaller dimensions through the fields) so that a family fits a disk. ``make_family(root, shape)``
# writes them like a LLaMA family; ``fp8_block=(128, 128)`` gives DeepSeek-V3's FP8 layout.


def _count(specs: list[tuple[str, tuple[int, ...]]]) -> int:
    n = 0
    for _, s in specs:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


@dataclasses.dataclass(frozen=True)
class DeepSeekV3Shape:
    """DeepseekV3ForCausalLM (HF names): MLA attention, ``first_k_dense`` dense MLP layers, then MoE layers of
    ``experts`` routed experts (+ ``shared_experts`` shared ones, one fused MLP) and a router. Defaults: the
    real model's dimensions (hidden 7168, 256 experts of 2048, 128 heads), 4 layers instead of 61."""

    hidden: int = 7168
    layers: int = 4
    first_k_dense: int = 3
    intermediate: int = 18432
    moe_intermediate: int = 2048
    experts: int = 256
    shared_experts: int = 1
    heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    vocab: int = 129280

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h = self.hidden
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,))]
            if n < self.first_k_dense:
                i = self.intermediate
                out += [(p + "mlp.down_proj.weight", (h, i)), (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h))]
            else:
                i = self.moe_intermediate
                for e in range(self.experts):
                    q = f"{p}mlp.experts.{e}."
                    out += [(q + "down_proj.weight", (h, i)), (q + "gate_proj.weight", (i, h)), (q + "up_proj.weight", (i, h))]
                out += [(p + "mlp.gate.e_score_correction_bias", (self.experts,)), (p + "mlp.gate.weight", (self.experts, h))]
                si = i * self.shared_experts
                out += [(p + "mlp.shared_experts.down_proj.weight", (h, si)), (p + "mlp.shared_experts.gate_proj.weight", (si, h)),
                        (p + "mlp.shared_experts.up_proj.weight", (si, h))]
            a = p + "self_attn."
            out += [
                (p + "post_attention_layernorm.weight", (h,)),
                (a + "kv_a_layernorm.weight", (self.kv_lora_rank,)),
                (a + "kv_a_proj_with_mqa.weight", (self.kv_lora_rank + self.qk_rope, h)),
                (a + "kv_b_proj.weight", (self.heads * (self.qk_nope + self.v_head), self.kv_lora_rank)),
                (a + "o_proj.weight", (h, self.heads * self.v_head)),
                (a + "q_a_layernorm.weight", (self.q_lora_rank,)),
                (a + "q_a_proj.weight", (self.q_lora_rank, h)),
                (a + "q_b_proj.weight", (self.heads * (self.qk_nope + self.qk_rope), self.q_lora_rank)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def numel(self) -> int:
        return _count(self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "moe_intermediate_size": self.moe_intermediate,
            "num_hidden_layers": self.layers, "first_k_dense_replace": self.first_k_dense,
            "n_routed_experts": self.experts, "n_shared_experts": self.shared_experts, "num_experts_per_tok": 8,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads, "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank, "qk_nope_head_dim": self.qk_nope, "qk_rope_head_dim": self.qk_rope,
            "v_head_dim": self.v_head, "vocab_size": self.vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": dtype, "bos_token_id": 0, "eos_token_id": 1,
        }


@dataclasses.dataclass(frozen=True)
class Qwen3MoeShape:
    """Qwen3MoeForCausalLM (Qwen3-30B-A3B's dimensions by default: hidden 2048, 128 experts of 768, 32 query
    and 4 key/value heads of 128, q/k norms), 4 layers instead of 48."""

    hidden: int = 2048
    layers: int = 4
    moe_intermediate: int = 768
    experts: int = 128
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 151936

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, d = self.hidden, self.moe_intermediate, self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,))]
            for e in range(self.experts):
                q = f"{p}mlp.experts.{e}."
                out += [(q + "down_proj.weight", (h, i)), (q + "gate_proj.weight", (i, h)), (q + "up_proj.weight", (i, h))]
            a = p + "self_attn."
            out += [
                (p + "mlp.gate.weight", (self.experts, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (a + "k_norm.weight", (d,)), (a + "k_proj.weight", (self.kv_heads * d, h)),
                (a + "o_proj.weight", (h, self.heads * d)), (a + "q_norm.weight", (d,)),
                (a + "q_proj.weight", (self.heads * d, h)), (a + "v_proj.weight", (self.kv_heads * d, h)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def numel(self) -> int:
        return _count(self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": self.hidden,
            "moe_intermediate_size": self.moe_intermediate, "intermediate_size": 6144, "num_hidden_layers": self.layers,
            "num_experts": self.experts, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": dtype, "bos_token_id": 151643, "eos_token_id": 151645,
        }


# ------------------------------------------------------------------------------------------------
# Vision-language families (``modules:``): a text decoder, a vision tower and the projector between them,
# with the Hugging Face tensor names and nested ``text_config`` / ``vision_config``. Tiny by default.


#: transformers >= 4.52 names a vision-language checkpoint's tensors differently: (earlier prefix, its
#: replacement), the first match applies
MODERN_LLAVA = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
MODERN_GEMMA3 = (("vision_tower.vision_model.", "model.vision_tower."),) + MODERN_LLAVA  # transformers 5: no vision_model.
MODERN_QWEN_VL = (("model.", "model.language_model."), ("visual.", "model.visual."))


def _renamed(specs: list[tuple[str, tuple[int, ...]]], rules: tuple[tuple[str, str], ...]) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for name, shape in specs:
        old, new = next(((o, n) for o, n in rules if name.startswith(o)), ("", ""))
        out.append((new + name[len(old):], shape))
    return out


@dataclasses.dataclass(frozen=True)
class Mistral3Shape:
    """Mistral3ForConditionalGeneration (Mistral-Small-3.1's LLaVA layout: ``language_model.``, a Pixtral
    ``vision_tower.``, ``multi_modal_projector.`` with a patch merger), as its Hub checkpoints name the tensors."""

    hidden: int = 64
    layers: int = 4
    intermediate: int = 96
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 128
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_intermediate: int = 48
    vision_heads: int = 2
    patch: int = 4
    spatial_merge: int = 2
    #: the names transformers >= 4.52 saves (``model.language_model.``...), not the earlier ones mergekit 0.1.5 knows
    modern: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, v, s = self.hidden, self.vision_hidden, self.spatial_merge
        out = [("vision_tower.ln_pre.weight", (v,)), ("vision_tower.patch_conv.weight", (v, 3, self.patch, self.patch))]
        for n in range(self.vision_layers):
            p = f"vision_tower.transformer.layers.{n}."
            vi = self.vision_intermediate
            out += [(p + "attention.k_proj.weight", (v, v)), (p + "attention.o_proj.weight", (v, v)),
                    (p + "attention.q_proj.weight", (v, v)), (p + "attention.v_proj.weight", (v, v)),
                    (p + "attention_norm.weight", (v,)), (p + "feed_forward.down_proj.weight", (v, vi)),
                    (p + "feed_forward.gate_proj.weight", (vi, v)), (p + "feed_forward.up_proj.weight", (vi, v)),
                    (p + "ffn_norm.weight", (v,))]
        q = "multi_modal_projector."
        out += [(q + "linear_1.weight", (h, v)), (q + "linear_2.weight", (h, h)), (q + "norm.weight", (v,)),
                (q + "patch_merger.merging_layer.weight", (v, v * s * s))]
        out += [(f"language_model.{n}", sh) for n, sh in LlamaShape(h, self.layers, self.intermediate, self.vocab, self.heads,
                                                                     self.kv_heads).tensors()]
        return _renamed(out, MODERN_LLAVA if self.modern else ())

    @property
    def numel(self) -> int:
        return _count(self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
            "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": self.spatial_merge,
            "vision_feature_layer": -1, "tie_word_embeddings": False, "torch_dtype": dtype,
            "text_config": {
                "model_type": "mistral", "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.hidden // self.heads, "vocab_size": self.vocab, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0, "sliding_window": None, "hidden_act": "silu",
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "pixtral", "hidden_size": self.vision_hidden, "intermediate_size": self.vision_intermediate,
                "num_hidden_layers": self.vision_layers, "num_attention_heads": self.vision_heads,
                "head_dim": self.vision_hidden // self.vision_heads, "num_channels": 3, "image_size": 16 * self.patch,
                "patch_size": self.patch, "hidden_act": "silu", "rope_theta": 10000.0,
            },
        }


@dataclasses.dataclass(frozen=True)
class Qwen2VLShape:
    """Qwen2VLForConditionalGeneration: a Qwen2 text model at the top level (``model.``, ``lm_head.``; q/k/v
    biases), the vision tower under ``visual.`` (a 3-D patch embedding, ``blocks``), the patch merger under
    ``visual.merger.``; config.json as Qwen2-VL's Hub checkpoints (text fields at the top level and in
    ``text_config``, ``vision_config.depth``)."""

    hidden: int = 64
    layers: int = 4
    intermediate: int = 96
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 128
    vision_embed: int = 32
    vision_depth: int = 3
    vision_heads: int = 2
    mlp_ratio: int = 2
    patch: int = 2
    temporal_patch: int = 2
    spatial_merge: int = 2
    #: the names transformers >= 4.52 saves (``model.language_model.``...), not the earlier ones mergekit 0.1.5 knows
    modern: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, e = self.hidden, self.intermediate, self.vision_embed
        kv = self.kv_heads * (h // self.heads)
        out = [("lm_head.weight", (self.vocab, h)), ("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.v_proj.weight", (kv, h))]
        out.append(("model.norm.weight", (h,)))
        for n in range(self.vision_depth):
            p = f"visual.blocks.{n}."
            out += [(p + "attn.proj.bias", (e,)), (p + "attn.proj.weight", (e, e)), (p + "attn.qkv.bias", (3 * e,)),
                    (p + "attn.qkv.weight", (3 * e, e))] + self._vision_mlp_norms(p)
        g = e * self.spatial_merge ** 2
        out += [(n, s) for n, s in (("visual.merger.ln_q.bias", (e,)), ("visual.merger.ln_q.weight", (e,))) if self._with_bias(n)]
        out += [("visual.merger.mlp.0.bias", (g,)), ("visual.merger.mlp.0.weight", (g, g)), ("visual.merger.mlp.2.bias", (h,)),
                ("visual.merger.mlp.2.weight", (h, g)),
                ("visual.patch_embed.proj.weight", (e, 3, self.temporal_patch, self.patch, self.patch))]
        return _renamed(out, MODERN_QWEN_VL if self.modern else ())

    def _vision_mlp_norms(self, p: str) -> list[tuple[str, tuple[int, ...]]]:
        """A vision block's MLP (fc1/fc2, GELU) and LayerNorms (weight and bias)."""
        e, m = self.vision_embed, self.vision_embed * self.mlp_ratio
        return [(p + "mlp.fc1.bias", (m,)), (p + "mlp.fc1.weight", (m, e)), (p + "mlp.fc2.bias", (e,)), (p + "mlp.fc2.weight", (e, m)),
                (p + "norm1.bias", (e,)), (p + "norm1.weight", (e,)), (p + "norm2.bias", (e,)), (p + "norm2.weight", (e,))]

    def _with_bias(self, name: str) -> bool:
        return True

    @property
    def numel(self) -> int:
        return _count(self.tensors())

    def config(self, dtype: str) -> dict:
        text = {
            "hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        }
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", **text, "torch_dtype": dtype,
            "vision_start_token_id": 100, "vision_end_token_id": 101, "image_token_id": 102, "video_token_id": 103,
            "text_config": {"model_type": "qwen2_vl_text", **text},
            "vision_config": {
                "depth": self.vision_depth, "embed_dim": self.vision_embed, "mlp_ratio": self.mlp_ratio,
                "num_heads": self.vision_heads, "in_chans": 3, "hidden_size": self.hidden, "patch_size": self.patch,
                "spatial_merge_size": self.spatial_merge, "temporal_patch_size": self.temporal_patch,
            },
        }


@dataclasses.dataclass(frozen=True)
class Qwen25VLShape(Qwen2VLShape):
    """Qwen2_5_VLForConditionalGeneration: Qwen2-VL's layout with a gated (SwiGLU) vision MLP with biases and
    RMSNorms (no bias) in the vision blocks and the merger; the text layer count in ``text_config``."""

    def _vision_mlp_norms(self, p: str) -> list[tuple[str, tuple[int, ...]]]:
        e, m = self.vision_embed, self.vision_embed * self.mlp_ratio
        return [(p + "mlp.down_proj.bias", (e,)), (p + "mlp.down_proj.weight", (e, m)), (p + "mlp.gate_proj.bias", (m,)),
                (p + "mlp.gate_proj.weight", (m, e)), (p + "mlp.up_proj.bias", (m,)), (p + "mlp.up_proj.weight", (m, e)),
                (p + "norm1.weight", (e,)), (p + "norm2.weight", (e,))]

    def _with_bias(self, name: str) -> bool:
        return not name.endswith(".bias")

    def config(self, dtype: str) -> dict:
        doc = super().config(dtype)
        e = self.vision_embed
        doc.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl")
        doc["text_config"]["model_type"] = "qwen2_5_vl_text"
        doc["vision_config"] = {
            "depth": self.vision_depth, "hidden_size": e, "intermediate_size": e * self.mlp_ratio, "num_heads": self.vision_heads,
            "in_channels": 3, "out_hidden_size": self.hidden, "patch_size": self.patch, "spatial_merge_size": self.spatial_merge,
            "temporal_patch_size": self.temporal_patch, "window_size": 4 * self.patch, "fullatt_block_indexes": [self.vision_depth - 1],
            "hidden_act": "silu",
        }
        return doc


@dataclasses.dataclass(frozen=True)
class Gemma3VLShape:
    """Gemma3ForConditionalGeneration (Gemma 3 4B-27B's layout: ``language_model.`` with q/k norms and four
    norms per layer, embeddings tied, so no ``lm_head``; a SigLIP ``vision_tower.vision_model.``; the
    ``multi_modal_projector.`` with its input projection and soft-embedding norm)."""

    hidden: int = 64
    layers: int = 4
    intermediate: int = 96
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 128
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_intermediate: int = 48
    vision_heads: int = 2
    image_size: int = 16
    patch: int = 4
    #: the names transformers >= 4.52 saves (``model.language_model.``...), not the earlier ones mergekit 0.1.5 knows
    modern: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, d, v, vi = self.hidden, self.intermediate, self.head_dim, self.vision_hidden, self.vision_intermediate
        out = [("language_model.model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"language_model.model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)), (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "post_feedforward_layernorm.weight", (h,)), (p + "pre_feedforward_layernorm.weight", (h,)),
                    (p + "self_attn.k_norm.weight", (d,)), (p + "self_attn.k_proj.weight", (self.kv_heads * d, h)),
                    (p + "self_attn.o_proj.weight", (h, self.heads * d)), (p + "self_attn.q_norm.weight", (d,)),
                    (p + "self_attn.q_proj.weight", (self.heads * d, h)), (p + "self_attn.v_proj.weight", (self.kv_heads * d, h))]
        out.append(("language_model.model.norm.weight", (h,)))
        out += [("multi_modal_projector.mm_input_projection_weight", (v, h)), ("multi_modal_projector.mm_soft_emb_norm.weight", (v,))]
        q = "vision_tower.vision_model."
        out += [(q + "embeddings.patch_embedding.bias", (v,)), (q + "embeddings.patch_embedding.weight", (v, 3, self.patch, self.patch)),
                (q + "embeddings.position_embedding.weight", ((self.image_size // self.patch) ** 2, v))]
        for n in range(self.vision_layers):
            p = f"{q}encoder.layers.{n}."
            out += [(p + "layer_norm1.bias", (v,)), (p + "layer_norm1.weight", (v,)), (p + "layer_norm2.bias", (v,)),
                    (p + "layer_norm2.weight", (v,)), (p + "mlp.fc1.bias", (vi,)), (p + "mlp.fc1.weight", (vi, v)),
                    (p + "mlp.fc2.bias", (v,)), (p + "mlp.fc2.weight", (v, vi))]
            out += [(p + f"self_attn.{x}_proj.{w}", (v,) if w == "bias" else (v, v))
                    for x in ("k", "out", "q", "v") for w in ("bias", "weight")]
        out += [(q + "post_layernorm.bias", (v,)), (q + "post_layernorm.weight", (v,))]
        return _renamed(out, MODERN_GEMMA3 if self.modern else ())

    @property
    def numel(self) -> int:
        return _count(self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 100,
            "eoi_token_index": 101, "image_token_index": 102, "mm_tokens_per_image": 4, "torch_dtype": dtype,
            "text_config": {
                "model_type": "gemma3_text", "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 64, "query_pre_attn_scalar": self.head_dim,
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                # one local (sliding) and one global layer in turn (Gemma 3 has 5 local per global one): per layer, so a
                # merge that changes the layers must change it too (transformers checks its length)
                "layer_types": ["sliding_attention" if n % 2 == 0 else "full_attention" for n in range(self.layers)],
            },
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": self.vision_hidden, "intermediate_size": self.vision_intermediate,
                "num_hidden_layers": self.vision_layers, "num_attention_heads": self.vision_heads, "image_size": self.image_size,
                "patch_size": self.patch, "vision_use_head": False,
            },
        }
