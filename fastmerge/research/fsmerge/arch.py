"""Architectures FS-Merge knows: specs, state-dict layouts and plain functional forwards.

Every architecture is described by a frozen *spec* (``MLPSpec``, ``ViTSpec``, ``BertSpec``) that

* converts a state dict in its original layout (timm / HF CLIP / HF BERT / ``nn.Sequential``-like MLP)
  to a flat *canonical* dict (``to_canonical``) and back (``from_canonical``, with the original keys,
  shapes and dtypes), so the folded model is saved exactly as the models came in;
* runs the original model from canonical parameters (``forward``): the reference the SuperNet is
  checked against, the teacher that produces the reconstruction targets, the student of distillation
  and the evaluator of every merged model.

Canonical names (PyTorch convention, ``nn.Linear`` weights are ``[out, in]``, ``y = x Wᵀ + b``):

* MLP: ``l{i}.w``, ``l{i}.b`` for the hidden layers i = 0..L-1 (the heads are not part of the backbone).
* ViT (pre-LN): ``patch.w`` ``[d, C·p·p]`` (+ ``patch.b``), ``cls`` ``[d]``, ``pos`` ``[T, d]``,
  optional ``ln_pre.{w,b}``, per block ``b{i}.{ln1,q,k,v,o,ln2,fc1,fc2}.{w,b}``, ``ln_post.{w,b}``,
  optional ``proj.w`` ``[d_out, d]`` (+ ``proj.b``).
* BERT (post-LN): ``emb.word`` ``[V, d]``, ``emb.pos`` ``[P, d]``, ``emb.type`` ``[2, d]``,
  ``emb.ln.{w,b}``, per block ``b{i}.{q,k,v,o,ln_att,fc1,fc2,ln_mlp}.{w,b}``, ``pool.{w,b}``.

``record(name, x)`` callbacks receive the input of every linear layer (RegMean's Gram matrices), and
``lora`` adds a low-rank term to chosen weights (distillation with LoRA).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Inputs = Union[Tensor, Mapping[str, Tensor]]
Params = Mapping[str, Tensor]
Record = Callable[[str, Tensor], None]


# ----------------------------------------------------------------------------------------------------
# inputs: a tensor (MLP rows, ViT images) or a dict of tensors sharing their first dim (BERT)


def n_inputs(x: Inputs) -> int:
    """Number of samples (first dimension) of ``x``."""
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def take(x: Inputs, idx: Tensor | slice) -> Inputs:
    """Rows ``idx`` of ``x`` (every tensor of a dict)."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, Mapping) else x[idx]


def cat_inputs(xs: Sequence[Inputs]) -> Inputs:
    """Concatenate inputs along the sample dimension."""
    if isinstance(xs[0], Mapping):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    return torch.cat(list(xs))


# ----------------------------------------------------------------------------------------------------
# shared pieces


ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # OpenAI CLIP's activation: x·sigmoid(1.702x)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "tanh": torch.tanh,
}


def act_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` (``relu``, ``gelu``, ``gelu_tanh``, ``quick_gelu``, ``tanh``)."""
    try:
        return ACTS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r} (known: {', '.join(ACTS)})") from None


def linear(p: Params, name: str, x: Tensor, record: Record | None = None, lora: Params | None = None) -> Tensor:
    """``x Wᵀ + b`` with ``W = p[name.w]`` (+ ``lora[name.a/b]`` as ``B·A``), bias if present."""
    if record is not None:
        record(name, x)
    y = x @ p[f"{name}.w"].T
    if lora is not None and f"{name}.a" in lora:
        y = y + (x @ lora[f"{name}.a"].T) @ lora[f"{name}.b"].T
    b = p.get(f"{name}.b")
    return y if b is None else y + b


def layer_norm(p: Params, name: str, x: Tensor, eps: float) -> Tensor:
    """LayerNorm with ``p[name.w]``, ``p[name.b]``."""
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.w"], p[f"{name}.b"], eps)


def mha(q: Tensor, k: Tensor, v: Tensor, heads: int, keep: Tensor | None = None) -> Tensor:
    """Multi-head attention on ``[B, T, d]`` tensors, softmax scale ``1/√(d/H)`` (the paper's ``√d`` is a
    typo, spec §2.3.2); ``keep`` ``[B, T]`` bool masks padded keys."""
    b, t, d = q.shape
    split = lambda z: z.reshape(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    mask = None if keep is None else keep[:, None, None, :]
    a = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return a.transpose(1, 2).reshape(b, t, d)


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, C·p·p]``, patches row-major, each flattened (C, ph, pw): the order of a
    stride-p conv's weight reshaped to ``[d, C·p·p]``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


# ----------------------------------------------------------------------------------------------------
# layouts: original state-dict keys <-> canonical names


@dataclasses.dataclass(frozen=True)
class Rule:
    """Canonical ``names`` (several: fused along dim 0, e.g. timm's qkv) stored under ``key`` (``{i}`` = block)."""

    names: tuple[str, ...]
    key: str


def _canon_shape(name: str, t: Tensor) -> Tensor:
    # cls tokens come as [1, 1, d] (timm) or [d] (CLIP); position tables as [1, T, d] or [T, d];
    # conv patch weights as [d, C, p, p]: canonical forms are [d], [T, d] and [d, C·p·p].
    if name == "cls":
        return t.reshape(-1)
    if name == "pos":
        return t.reshape(-1, t.shape[-1])
    if name == "patch.w":
        return t.reshape(t.shape[0], -1)
    return t


def _rules(rules: Sequence[tuple[str | tuple[str, ...], str]]) -> tuple[Rule, ...]:
    return tuple(Rule((n,) if isinstance(n, str) else tuple(n), k) for n, k in rules)


def _lin(canon: str, key: str) -> list[tuple[str, str]]:
    return [(f"{canon}.w", f"{key}.weight"), (f"{canon}.b", f"{key}.bias")]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A state-dict naming scheme: ``rules`` for the model-level entries, ``block_rules`` per block ``{i}``.
    Entries whose key is absent (a bias-free linear, no ``ln_pre``) are simply absent canonically."""

    name: str
    rules: tuple[Rule, ...]
    block_rules: tuple[Rule, ...]
    prefix: str = ""

    def with_prefix(self, prefix: str) -> "Layout":
        """The same layout under ``prefix`` (e.g. ``"bert."`` for ``BertForSequenceClassification``)."""
        return dataclasses.replace(self, prefix=prefix)

    def _all(self, depth: int) -> list[Rule]:
        out = list(self.rules)
        for i in range(depth):
            out += [Rule(tuple(n.format(i=i) for n in r.names), r.key.format(i=i)) for r in self.block_rules]
        return [Rule(r.names, self.prefix + r.key) for r in out]

    def to_canonical(self, sd: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
        """Canonical tensors (views of ``sd``'s, original dtype) for every rule whose key is present."""
        out: dict[str, Tensor] = {}
        for r in self._all(depth):
            if r.key not in sd:
                continue
            t = sd[r.key]
            parts = t.chunk(len(r.names), dim=0) if len(r.names) > 1 else (t,)
            for n, part in zip(r.names, parts):
                out[n] = _canon_shape(n, part)
        return out

    def from_canonical(self, canon: Mapping[str, Tensor], template: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
        """A state dict with ``template``'s keys (those the layout knows), shapes and dtypes, from ``canon``."""
        out: dict[str, Tensor] = {}
        for r in self._all(depth):
            if r.key not in template:
                continue
            tt = template[r.key]
            t = torch.cat([canon[n] for n in r.names]) if len(r.names) > 1 else canon[r.names[0]]
            out[r.key] = t.reshape(tt.shape).to(tt.dtype).contiguous()
        return out

    def known_keys(self, sd: Mapping[str, Tensor], depth: int) -> set[str]:
        """The keys of ``sd`` some rule maps."""
        return {r.key for r in self._all(depth) if r.key in sd}


def _depth_from(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(ids) + 1 if ids else 0


#: timm's VisionTransformer (fused ``qkv``) and the lab's TinyViT (``fastmerge.research.lab.models``)
TIMM_VIT = Layout(
    "timm",
    _rules(
        _lin("patch", "patch_embed.proj")
        + [("cls", "cls_token"), ("pos", "pos_embed")]
        + _lin("ln_pre", "norm_pre")
        + _lin("ln_post", "norm")
    ),
    _rules(
        _lin("b{i}.ln1", "blocks.{i}.norm1")
        + [(("b{i}.q.w", "b{i}.k.w", "b{i}.v.w"), "blocks.{i}.attn.qkv.weight"),
           (("b{i}.q.b", "b{i}.k.b", "b{i}.v.b"), "blocks.{i}.attn.qkv.bias")]
        + _lin("b{i}.o", "blocks.{i}.attn.proj")
        + _lin("b{i}.ln2", "blocks.{i}.norm2")
        + _lin("b{i}.fc1", "blocks.{i}.mlp.fc1")
        + _lin("b{i}.fc2", "blocks.{i}.mlp.fc2")
    ),
)

#: Hugging Face ``CLIPVisionModelWithProjection`` (the paper's OpenCLIP ViT-B-16 skeleton, in HF names)
HF_CLIP_VISION = Layout(
    "hf_clip",
    _rules(
        _lin("patch", "vision_model.embeddings.patch_embedding")
        + [("cls", "vision_model.embeddings.class_embedding"),
           ("pos", "vision_model.embeddings.position_embedding.weight")]
        + _lin("ln_pre", "vision_model.pre_layrnorm")
        + _lin("ln_post", "vision_model.post_layernorm")
        + _lin("proj", "visual_projection")
    ),
    _rules(
        _lin("b{i}.ln1", "vision_model.encoder.layers.{i}.layer_norm1")
        + _lin("b{i}.q", "vision_model.encoder.layers.{i}.self_attn.q_proj")
        + _lin("b{i}.k", "vision_model.encoder.layers.{i}.self_attn.k_proj")
        + _lin("b{i}.v", "vision_model.encoder.layers.{i}.self_attn.v_proj")
        + _lin("b{i}.o", "vision_model.encoder.layers.{i}.self_attn.out_proj")
        + _lin("b{i}.ln2", "vision_model.encoder.layers.{i}.layer_norm2")
        + _lin("b{i}.fc1", "vision_model.encoder.layers.{i}.mlp.fc1")
        + _lin("b{i}.fc2", "vision_model.encoder.layers.{i}.mlp.fc2")
    ),
)

#: Hugging Face ``BertModel`` (use ``.with_prefix("bert.")`` for the task models)
HF_BERT = Layout(
    "hf_bert",
    _rules(
        [("emb.word", "embeddings.word_embeddings.weight"),
         ("emb.pos", "embeddings.position_embeddings.weight"),
         ("emb.type", "embeddings.token_type_embeddings.weight")]
        + _lin("emb.ln", "embeddings.LayerNorm")
        + _lin("pool", "pooler.dense")
    ),
    _rules(
        _lin("b{i}.q", "encoder.layer.{i}.attention.self.query")
        + _lin("b{i}.k", "encoder.layer.{i}.attention.self.key")
        + _lin("b{i}.v", "encoder.layer.{i}.attention.self.value")
        + _lin("b{i}.o", "encoder.layer.{i}.attention.output.dense")
        + _lin("b{i}.ln_att", "encoder.layer.{i}.attention.output.LayerNorm")
        + _lin("b{i}.fc1", "encoder.layer.{i}.intermediate.dense")
        + _lin("b{i}.fc2", "encoder.layer.{i}.output.dense")
        + _lin("b{i}.ln_mlp", "encoder.layer.{i}.output.LayerNorm")
    ),
)

LAYOUTS = {"timm": TIMM_VIT, "lab": TIMM_VIT, "hf_clip": HF_CLIP_VISION, "hf_bert": HF_BERT}


def _layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})") from None


# ----------------------------------------------------------------------------------------------------
# MLP


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A ReLU-style MLP backbone: hidden ``nn.Linear`` layers stored under ``keys`` (prefixes, in order),
    ``act`` after each. Features = the last hidden activation; task heads stay outside the backbone."""

    keys: tuple[str, ...]
    act: str = "relu"

    kind = "mlp"

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], act: str = "relu", exclude: Sequence[str] = ("head",)) -> "MLPSpec":
        """The 2-D ``*.weight`` entries of ``sd`` in insertion order, minus those under ``exclude``."""
        keys = tuple(
            k[: -len(".weight")]
            for k, v in sd.items()
            if k.endswith(".weight") and v.dim() == 2 and not any(k.startswith(e + ".") or k == e for e in exclude)
        )
        if not keys:
            raise ValueError("no hidden linear layer found in the state dict")
        return cls(keys, act)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.keys)

    def to_canonical(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``l{i}.w`` / ``l{i}.b`` of the hidden layers (views, original dtypes)."""
        out = {}
        for i, k in enumerate(self.keys):
            out[f"l{i}.w"] = sd[f"{k}.weight"]
            if f"{k}.bias" in sd:
                out[f"l{i}.b"] = sd[f"{k}.bias"]
        return out

    def from_canonical(self, canon: Params, template: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``canon`` under ``template``'s hidden-layer keys, shapes and dtypes."""
        out = {}
        for i, k in enumerate(self.keys):
            for suf, c in (("weight", "w"), ("bias", "b")):
                key = f"{k}.{suf}"
                if key in template:
                    out[key] = canon[f"l{i}.{c}"].reshape(template[key].shape).to(template[key].dtype).contiguous()
        return out

    def known_keys(self, sd: Mapping[str, Tensor]) -> set[str]:
        """The hidden layers' keys present in ``sd``."""
        return {f"{k}.{s}" for k in self.keys for s in ("weight", "bias") if f"{k}.{s}" in sd}

    def linear_names(self) -> list[str]:
        """Canonical names of the linear layers (RegMean, LoRA)."""
        return [f"l{i}" for i in range(self.depth)]

    def feature_dim(self, canon: Params) -> int:
        """Width of the features (the heads' input)."""
        return canon[f"l{self.depth - 1}.w"].shape[0]

    def forward(self, p: Params, x: Tensor, record: Record | None = None, lora: Params | None = None,
                trace: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Last hidden activation ``[B, d_L]``; ``trace`` collects (pre-activation, activation) per layer."""
        act = act_fn(self.act)
        h = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            z = linear(p, f"l{i}", h, record, lora)
            h = act(z)
            if trace is not None:
                trace.append((z, h))
        return h


class _LayoutSpec:
    """The transformer specs' state-dict conversions, through their ``layout``."""

    depth: int
    layout: str | Layout

    def to_canonical(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Canonical tensors of ``sd`` (views, original dtypes)."""
        return _layout(self.layout).to_canonical(sd, self.depth)

    def from_canonical(self, canon: Params, template: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``canon`` under ``template``'s keys (those the layout maps), shapes and dtypes."""
        return _layout(self.layout).from_canonical(canon, template, self.depth)

    def known_keys(self, sd: Mapping[str, Tensor]) -> set[str]:
        """The keys of ``sd`` the layout maps: the backbone (not task heads, not buffers)."""
        return _layout(self.layout).known_keys(sd, self.depth)


# ----------------------------------------------------------------------------------------------------
# ViT (pre-LN; timm / CLIP)


@dataclasses.dataclass(frozen=True)
class ViTSpec(_LayoutSpec):
    """A pre-LN ViT: patch embedding (conv or linear, optional bias), class token first, learned position
    embeddings, optional ``ln_pre``, ``depth`` blocks ``x + attn(ln1 x)``, ``x + fc2(act(fc1(ln2 x)))``,
    ``ln_post`` on the class token, optional bias-free projection (CLIP). Features = that vector."""

    dim: int
    depth: int
    heads: int
    patch: int
    eps: float = 1e-5
    act: str = "gelu"
    layout: str | Layout = "timm"

    kind = "vit"

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], heads: int, patch: int, layout: str | Layout = "timm",
                        eps: float = 1e-5, act: str = "gelu") -> "ViTSpec":
        """The spec of ``sd``: width from the class token, depth from the block keys (heads, patch size,
        eps and activation are not recoverable from shapes alone and must be given)."""
        lay = _layout(layout)
        layer_re = {"timm": r"blocks\.(\d+)\.", "hf_clip": r"vision_model\.encoder\.layers\.(\d+)\."}
        pat = re.escape(lay.prefix) + layer_re.get(lay.name, r"blocks\.(\d+)\.")
        depth = _depth_from(sd, pat)
        canon = lay.to_canonical(sd, 0)
        return cls(canon["cls"].shape[0], depth, heads, patch, eps, act, layout)

    def linear_names(self) -> list[str]:
        """Canonical names of the linear layers (RegMean, LoRA); absent ones (no ``proj``) are skipped by users."""
        names = ["patch"]
        for i in range(self.depth):
            names += [f"b{i}.{n}" for n in ("q", "k", "v", "o", "fc1", "fc2")]
        return names + ["proj"]

    def feature_dim(self, canon: Params) -> int:
        """Width of the features: the projection's output, else the model width."""
        return canon["proj.w"].shape[0] if "proj.w" in canon else self.dim

    def forward(self, p: Params, images: Tensor, record: Record | None = None, lora: Params | None = None) -> Tensor:
        """Image features ``[B, d_out]``: ``proj(ln_post(x_L[CLS]))``."""
        act = act_fn(self.act)
        lin = lambda n, x: linear(p, n, x, record, lora)  # noqa: E731
        z = lin("patch", patchify(images, self.patch))
        x = torch.cat([p["cls"].expand(z.shape[0], 1, -1), z], dim=1) + p["pos"]
        if "ln_pre.w" in p:
            x = layer_norm(p, "ln_pre", x, self.eps)
        for i in range(self.depth):
            h = layer_norm(p, f"b{i}.ln1", x, self.eps)
            a = mha(lin(f"b{i}.q", h), lin(f"b{i}.k", h), lin(f"b{i}.v", h), self.heads)
            x = x + lin(f"b{i}.o", a)
            h = layer_norm(p, f"b{i}.ln2", x, self.eps)
            x = x + lin(f"b{i}.fc2", act(lin(f"b{i}.fc1", h)))
        f = layer_norm(p, "ln_post", x[:, 0], self.eps)
        return lin("proj", f) if "proj.w" in p else f


# ----------------------------------------------------------------------------------------------------
# BERT (post-LN)


@dataclasses.dataclass(frozen=True)
class BertSpec(_LayoutSpec):
    """A post-LN BERT encoder with pooler (HF ``BertModel``): ``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))``,
    features = ``tanh(pool(x[CLS]))``. Inputs: ``{"input_ids", "attention_mask"?, "token_type_ids"?}``."""

    dim: int
    depth: int
    heads: int
    eps: float = 1e-12
    act: str = "gelu"
    layout: str | Layout = "hf_bert"

    kind = "bert"

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], heads: int, layout: str | Layout = "hf_bert",
                        eps: float = 1e-12, act: str = "gelu") -> "BertSpec":
        """The spec of ``sd``: width from the word embeddings, depth from the layer keys."""
        lay = _layout(layout)
        depth = _depth_from(sd, re.escape(lay.prefix) + r"encoder\.layer\.(\d+)\.")
        dim = sd[lay.prefix + "embeddings.word_embeddings.weight"].shape[1]
        return cls(dim, depth, heads, eps, act, layout)

    def linear_names(self) -> list[str]:
        """Canonical names of the linear layers (RegMean, LoRA)."""
        names = []
        for i in range(self.depth):
            names += [f"b{i}.{n}" for n in ("q", "k", "v", "o", "fc1", "fc2")]
        return names + ["pool"]

    def feature_dim(self, canon: Params) -> int:
        """Width of the pooled features."""
        return canon["pool.w"].shape[0]

    @staticmethod
    def unpack(inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(input ids, token types (default 0), keep mask (bool) or None)."""
        ids = inputs["input_ids"]
        tt = inputs.get("token_type_ids")
        mask = inputs.get("attention_mask")
        return ids, torch.zeros_like(ids) if tt is None else tt, None if mask is None else mask.bool()

    def forward(self, p: Params, inputs: Mapping[str, Tensor], record: Record | None = None, lora: Params | None = None) -> Tensor:
        """Pooled features ``[B, d]``."""
        act = act_fn(self.act)
        lin = lambda n, x: linear(p, n, x, record, lora)  # noqa: E731
        ids, tt, keep = self.unpack(inputs)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = p["emb.word"][ids] + p["emb.pos"][pos] + p["emb.type"][tt]
        x = layer_norm(p, "emb.ln", x, self.eps)
        for i in range(self.depth):
            a = mha(lin(f"b{i}.q", x), lin(f"b{i}.k", x), lin(f"b{i}.v", x), self.heads, keep)
            x = layer_norm(p, f"b{i}.ln_att", x + lin(f"b{i}.o", a), self.eps)
            x = layer_norm(p, f"b{i}.ln_mlp", x + lin(f"b{i}.fc2", act(lin(f"b{i}.fc1", x))), self.eps)
        return torch.tanh(lin("pool", x[:, 0]))


Spec = Union[MLPSpec, ViTSpec, BertSpec]


def canonical_fp32(spec: Spec, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``spec.to_canonical(sd)`` upcast to fp32 (all FS-Merge arithmetic is fp32; the fold rounds once)."""
    return {k: v.detach().float() for k, v in spec.to_canonical(sd).items()}


def features(spec: Spec, canon: Params, inputs: Inputs, batch_size: int = 1024) -> Tensor:
    """``spec.forward`` without gradients, in batches (targets and evaluation)."""
    n = n_inputs(inputs)
    with torch.no_grad():
        # n = 0: one empty batch, shape kept
        return torch.cat([spec.forward(canon, take(inputs, slice(i, i + batch_size))) for i in range(0, max(n, 1), batch_size)])


def check_same_shapes(canons: Sequence[Params], where: str = "fsmerge") -> None:
    """All models must have the same canonical names and shapes (FS-Merge merges equal architectures)."""
    ref = canons[0]
    for j, c in enumerate(canons[1:], start=2):
        if set(c) != set(ref):
            raise ValueError(f"{where}: model {j} has entries {sorted(set(c) ^ set(ref))} the first model lacks or has")
        for k in ref:
            if c[k].shape != ref[k].shape:
                raise ValueError(f"{where}: '{k}' is {list(c[k].shape)} in model {j}, {list(ref[k].shape)} in model 1")
