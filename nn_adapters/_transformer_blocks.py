"""Transformer block adapters: find blocks, run them, capture unit activations, and shrink them physically.

One small adapter class per block kind behind a common interface (the Torch-Pruning habit of one handler per
module type), so that :mod:`nn_adapters.transformer` only orchestrates:

``_HFBlock`` subclasses
    Hugging Face encoder layers, each described by the paths of its parts: ``_HFBertBlock`` (BERT, RoBERTa,
    ELECTRA, MiniLM and other ``BertLayer`` look-alikes: ``attention.self.{query,key,value}``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``; post-LN, or pre-LN as in MegatronBERT),
    ``_HFDebertaV2Block`` (DeBERTa-v2/v3) and ``_HFDebertaBlock`` (DeBERTa v1: query, key and value fused head by
    head), ``_HFLongformerBlock`` (Longformer: the FFN), ``_HFMPNetBlock`` (MPNet, with its per-head relative
    position bias), ``_HFDistilBertBlock`` (DistilBERT),
    ``_HFViTBlock`` (ViT / DeiT, pre-LN), ``_HFDinov2Block`` (DINOv2, pre-LN with layer scales; DINOv3's
    ``_HFDinov3Block`` with rotary embeddings), their
    ``query/key/value`` + ``attention.output.dense`` counterparts ``_HFViTLegacyBlock`` and ``_HFDinov2LegacyBlock``
    (the layouts of transformers 4 and of 5 before 5.9 and 5.18) and ``_HFCLIPBlock`` (CLIP / SigLIP-style text and
    vision towers, pre-LN; heads only with a transformers whose attention reshapes to its own width),
    ``_HFModernBertBlock`` (ModernBERT: ``attn.Wqkv`` fused, the gated FFN's two halves fused in ``mlp.Wi``) and
    ``_HFLlamaBlock`` (Llama-style decoders: gated FFN ``mlp.{gate,up,down}_proj``, grouped-query attention; Granite's
    residual multiplier read as an output scale), ``_HFMoEBlock`` (its mixture-of-experts look-alikes, experts as 3D
    tensors: Mixtral, Qwen2/3-MoE...), ``_HFLlamaPlainBlock`` and its renamings ``_HFApertusBlock``,
    ``_HFNanoChatBlock`` (Llama's attention with a plain FFN: Nemotron, Arcee, Jais 2, Apertus, NanoChat),
    ``_HFGteBlock`` and ``_HFJinaV3Block`` (the Llama parts post-LN, BERT's order: GTE v1.5, Nomic Embed, Jina
    Embeddings v3), ``_HFEsmcBlock`` (ESM C: each sublayer's output divided by ``scaling_factor``),
    ``_HFGemma2Block`` and ``_HFOlmo2Block`` (its look-alikes with RMS norms after the attention and the FFN, read
    by :meth:`_Block.output_norm`: Gemma 2 and 3; OLMo 2 and 3, EXAONE 4), ``_HFPhi3Block`` (Phi-3: query, key
    and value fused in ``qkv_proj``, gate and up in ``gate_up_proj``), ``_HFGlmBlock`` and ``_HFGlm4Block`` (GLM
    and GLM-4: gate and up fused; GLM-4 with norms after the sublayers),
    ``_HFBartBlock`` (BART-family encoder and decoder layers, post-LN or pre-LN as their forward reads),
    ``_HFWav2Vec2Block`` (wav2vec 2.0-family speech encoder layers, post-LN or pre-LN),
    ``_HFOPTBlock`` (OPT decoders, pre-LN or post-LN, the FFN on flattened tokens), ``_HFGPT2Block`` (GPT-2:
    ``Conv1D`` projections with ``(in, out)`` weights, query/key/value fused in ``attn.c_attn``), and the
    parallel-residual decoders ``_HFGPTJBlock`` (GPT-J), ``_HFGPTNeoXBlock`` (GPT-NeoX / Pythia, query/key/value
    fused head by head; also sequential), ``_HFPhiBlock`` (Phi-1/1.5/2) and ``_HFCohereBlock``, whose branches'
    residual is read from the block output (:data:`BLOCK_OUTPUT`); ``_HFStableLmBlock`` (either way),
    ``_HFStarcoder2Block``, ``_HFGPTNeoBlock`` and
    ``_HFBloomBlock`` (BLOOM: fused head by head, residuals added inside the attention and the MLP),
    ``_HFFalconBlock`` (Falcon's three fused layouts, in parallel or in sequence), ``_HFGPTBigCodeBlock``
    (StarCoder, SantaCoder), ``_HFMptBlock`` (MPT; BLOOM and MPT slice their ALiBi slopes per layer,
    ``_PerHeadBias``) and ``_HFT5Block`` (T5-style blocks, each replayed with its own arguments; heads with
    transformers >= 5).
``_TorchEncoderBlock``
    :class:`torch.nn.TransformerEncoderLayer`, post-LN or pre-LN (``norm_first=True``).
Hybrid stacks
    The layers of LFM2/LFM3, Granite 4.0 hybrid, Qwen3.5 / Qwen3-Next, Jamba and NemotronH: a block without heads
    (``_NoHeads``: a convolution, Mamba or linear-attention layer with an FFN) or without an FFN (``_NoFFN``:
    NemotronH's attention layers); a layer of a stack that is not recognised at all sits between blocks as an
    ``OpaqueLayer``, run as it is (:func:`link_opaque_layers`).

Units: an FFN unit is one intermediate neuron, i.e. one column of the down projection's input and one row of
every producer (``up``, or ``gate`` and ``up`` in a gated FFN); an attention unit is one head, i.e. ``head_dim``
consecutive columns of the output projection's input (rows ``h*head_dim ... (h+1)*head_dim - 1`` of the query,
key and value projections), or under grouped-query attention one key/value group (its key/value head and the
query heads that read it).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._experts import drop_experts
from ._modes import HOOK_DICTS

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head self-attention whose inner width ``num_heads * head_dim`` may be smaller than ``embed_dim``.

    :class:`torch.nn.MultiheadAttention` ties the inner width to ``embed_dim`` (``head_dim = embed_dim //
    num_heads``), so removing heads while keeping ``head_dim`` cannot be expressed with it. This module takes
    its place in a :class:`torch.nn.TransformerEncoderLayer` with the same call signature and the same packed
    ``in_proj_weight`` layout (query rows, then key rows, then value rows; head-major inside each).

    ``_qkv_same_embed_dim`` is ``False`` on purpose: it switches off PyTorch's fused encoder fast path, which
    assumes an unpruned :class:`~torch.nn.MultiheadAttention`.

    A module made by removing heads records which of the original heads it kept (the buffer ``kept_heads``,
    saved with the weights, and ``original_num_heads``), so that the per-head masks written for the original
    attention (3-D ``attn_mask`` of shape ``(batch * original_num_heads, tq, tk)``) still apply: it takes the
    slices of its own heads. A per-head mask for the kept heads, ``(batch * num_heads, tq, tk)``, works too.

    Parameters
    ----------
    embed_dim : int
        Model width (input and output size).
    num_heads : int
        Number of heads kept.
    head_dim : int
        Width of one head (unchanged by pruning).
    bias : bool
        Whether the input projection has a bias (the output projection follows ``out_bias``).
    batch_first : bool
        Layout of inputs, as in :class:`~torch.nn.MultiheadAttention`.
    dropout : float
        Dropout on the attention weights in training mode.
    out_bias : bool
        Whether the output projection has a bias.

    Examples
    --------
    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> pm = PrunedMultiheadAttention.from_multihead_attention(mha).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> torch.allclose(pm(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)
    True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be >= 1, got {num_heads} and {head_dim}")
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.inner_dim = self.num_heads * self.head_dim
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self._qkv_same_embed_dim = False  # disables the fused fast path of nn.TransformerEncoderLayer
        self.in_proj_weight = nn.Parameter(torch.empty(3 * self.inner_dim, self.embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * self.inner_dim)) if bias else None
        self.out_proj = nn.Linear(self.inner_dim, self.embed_dim, bias=out_bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        #: head count of the attention this one was cut from, and the indices of the heads kept there (None: not
        #: recorded, as in a module built directly or saved before they were)
        self.original_num_heads = self.num_heads
        self.register_buffer("kept_heads", None)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """An exact copy of an unpruned :class:`~torch.nn.MultiheadAttention` (self-attention layout)."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only MultiheadAttention with kdim == vdim == embed_dim can be converted; "
                             "build it without kdim/vdim")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported "
                             "for head pruning; prune target='ffn' instead")
        new = _uninitialised(lambda: cls(mha.embed_dim, mha.num_heads, mha.head_dim,
                                         bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                                         dropout=mha.dropout, out_bias=mha.out_proj.bias is not None),
                             mha.in_proj_weight)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if new.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        new.out_proj.train(mha.out_proj.training)
        _same_grad_flags(new, mha)
        _same_hooks(new.out_proj, mha.out_proj)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as :meth:`torch.nn.MultiheadAttention.forward` (2-D or per-head 3-D ``attn_mask``).

        As there, ``need_weights=False`` (the call of :class:`torch.nn.TransformerEncoderLayer`) computes the
        attention with :func:`torch.nn.functional.scaled_dot_product_attention`, which gives zeros to a query that
        sees no key (a padded position under a causal mask, an all-padding sequence); with weights, such a query's
        row is NaN, as in :class:`torch.nn.MultiheadAttention`.
        """
        if query.dim() != 3:
            raise ValueError(f"expected batched 3-D inputs, got query of shape {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, tq, _ = query.shape
        tk = key.shape[1]
        w = self.in_proj_weight
        bias = self.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        wq, wk, wv = w.chunk(3)
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, wq, bq).view(b, tq, h, d).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, tk, h, d).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, tk, h, d).transpose(1, 2)
        if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] != b * h:
            attn_mask = self._own_heads(attn_mask, b)
        mask = _additive_mask(attn_mask, key_padding_mask, b, h, tq, tk, q.dtype, is_causal, q.device)
        if not need_weights:
            # what nn.MultiheadAttention computes without weights (the call of nn.TransformerEncoderLayer): a query
            # that sees no key (a padded query under a causal mask, an all-padding sequence) gets zeros there, not
            # the NaN of an explicit softmax, which would reach the real tokens of the next layer as NaN keys
            p = self.dropout if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            out = self.out_proj(ctx.transpose(1, 2).reshape(b, tq, h * d))
            return (out if self.batch_first else out.transpose(0, 1)), None
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            probs = F.dropout(probs, p=self.dropout)
        ctx = (probs @ v).transpose(1, 2).reshape(b, tq, h * d)
        out = self.out_proj(ctx)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, weights


    def _own_heads(self, attn_mask: torch.Tensor, b: int) -> torch.Tensor:
        """The slices of this module's heads in a per-head mask written for the original attention."""
        n = self.original_num_heads
        if self.kept_heads is None or attn_mask.shape[0] != b * n or n == self.num_heads:
            hint = (f"(batch * {n} original heads, tq, tk) or " if self.kept_heads is not None and
                    n != self.num_heads else "")
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is a per-head mask for "
                             f"{attn_mask.shape[0] / b:g} heads, and this attention has {self.num_heads} heads for "
                             f"a batch of {b}: pass a 3-D mask of shape {hint}(batch * {self.num_heads}, tq, tk), or "
                             "the same mask for every head as a 2-D (tq, tk) attn_mask, or the padding as "
                             "key_padding_mask (batch, tk).")
        keep = self.kept_heads.to(attn_mask.device)
        return attn_mask.unflatten(0, (b, n))[:, keep].flatten(0, 1)


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    b: int,
    h: int,
    tq: int,
    tk: int,
    dtype: torch.dtype,
    is_causal: bool,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Combine MultiheadAttention-style masks into one additive ``(b, h, tq, tk)`` (broadcastable) mask."""

    def to_additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    total = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1)  # on the queries' device
    if attn_mask is not None:
        m = to_additive(attn_mask)
        if m.dim() == 2:
            m = m.view(1, 1, tq, tk)
        elif m.dim() == 3 and m.shape[0] == b * h:
            m = m.view(b, h, tq, tk)
        else:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not fit {h} heads: pass a 2-D "
                             f"(tq, tk) mask or a 3-D (batch * {h}, tq, tk) mask")
        total = m
    if key_padding_mask is not None:
        m = to_additive(key_padding_mask).view(b, 1, 1, tk)
        total = m if total is None else total + m
    return total


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer that stores its weight transposed, ``(in, out)``: the ``Conv1D`` of
    GPT-2 and OpenAI GPT (``transformers.pytorch_utils.Conv1D``, ``x @ weight + bias``)."""
    w = getattr(module, "weight", None)
    # transformers 4 keeps only nf (the output width); later releases keep nx too
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] == getattr(module, "nf", None) and getattr(module, "nx", w.shape[0]) == w.shape[0])


def weight_of(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (a view of the parameter: writes to it
    reach the module)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _uninitialised(build: Callable[[], nn.Module], like: torch.Tensor) -> nn.Module:
    """``build()``, a new module whose tensors are about to be overwritten, with uninitialised tensors on the device
    and in the dtype of ``like``: built on ``meta`` (its random initialisation computes nothing) and then given
    empty storage (``to_empty``); shapes only where ``like`` is a ``meta`` tensor. Initialising a layer the size of
    an LLM's FFN costs a fraction of a second and writes all of its memory for nothing."""
    with torch.device("meta"):
        new = build()
    return new.to(dtype=like.dtype).to_empty(device=like.device)


def _linear_like(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new layer of ``old``'s kind (``nn.Linear``, or a GPT-2 ``Conv1D``) with the given weight (out, in) and
    bias, on the old one's device and dtype (a ``Conv1D`` always has a bias: zeros where none is given)."""
    conv1d = is_conv1d(old)
    if conv1d:
        new = _uninitialised(lambda: type(old)(weight.shape[0], weight.shape[1]), old.weight)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    else:
        new = _uninitialised(lambda: nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), old.weight)
    with torch.no_grad():
        weight_of(new).copy_(weight.to(old.weight.dtype))
        if bias is not None:
            new.bias.copy_(bias.to(old.weight.dtype))
    new.train(old.training)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:  # a bias the old layer lacked (added by a refit) follows its weight
        new.bias.requires_grad_((old.bias if old.bias is not None else old.weight).requires_grad)
    _same_hooks(new, old)
    return new


def _index_to(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``index`` (kept units, heads or rows) on the device of the tensor ``like`` it selects from; left where it is
    when ``like`` is a ``meta`` tensor (a shape-only model being resized by the loaders): an index on ``meta`` would
    lose its values, which the checks of a kept set (as many heads in each group) read, and a ``meta`` tensor can
    be indexed by a CPU one."""
    return index if like.is_meta else index.to(like.device)


def _sliced_parameter(p: nn.Parameter, index: torch.Tensor, dim: int = 0) -> nn.Parameter:
    """A new parameter holding the entries ``index`` of ``p`` along ``dim`` (a per-head bias, sink or bias-table
    column), with ``p``'s device, dtype and ``requires_grad``."""
    return nn.Parameter(p.detach().index_select(dim, _index_to(index, p)).clone(), requires_grad=p.requires_grad)


def _same_grad_flags(new: nn.Module, old: nn.Module) -> None:
    """Give ``new``'s parameters the ``requires_grad`` of ``old``'s parameters of the same name (frozen stay frozen),
    and ``new`` the hooks of ``old``."""
    flags = {name: p.requires_grad for name, p in old.named_parameters()}
    for name, p in new.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    _same_hooks(new, old)


def _same_hooks(new: nn.Module, old: nn.Module) -> None:
    """Register on ``new`` (a replacement module) the forward/backward hooks the user had on ``old``."""
    for attr in HOOK_DICTS:
        src, dst = getattr(old, attr, None), getattr(new, attr, None)
        if src and dst is not None:
            dst.update(src)


def _three_blocks(weight: torch.Tensor) -> list[torch.Tensor]:
    """The query, key and value rows of a projection that stacks them as three equal blocks (GPT-2, MPT)."""
    width = weight.shape[0] // 3
    return [weight[i * width:(i + 1) * width] for i in range(3)]


def _multi_query_rows(cols: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The rows of a multi-query projection (every query head, then one shared key and one shared value head, as
    Falcon-7B and StarCoder) to keep for the query heads whose rows are ``cols``: those, and the shared rows."""
    shared = torch.arange(n_heads * head_dim, (n_heads + 2) * head_dim, device=cols.device)
    return torch.cat([cols, shared])


def _three_block_rows(rows: torch.Tensor, width: int) -> torch.Tensor:
    """The rows of such a projection that belong to the heads whose rows in one block are ``rows``."""
    return torch.cat([rows + i * width for i in range(3)])


#: :meth:`_Block.residual_input` of a stage whose consumer output is added straight into the block output.
BLOCK_OUTPUT = "block output"


@dataclasses.dataclass(frozen=True)
class BranchSum:
    """:meth:`_Block.residual_input` of a stage whose output (times its output scale) is summed with other branches
    and the block input into the input ``index`` of ``module``, read there: the residual is that sum minus the
    stage's output (Falcon-H1's attention, beside its Mamba mixer, before the FFN)."""

    module: nn.Module
    index: int = 0


#: While ``prune_transformer(..., head_unit="query")`` runs: Llama-style attentions with grouped-query attention
#: lose query heads, as many in every key/value group, their key and value heads kept, instead of whole groups (read
#: by :meth:`_HFLlamaBlock.prepare_heads`, which marks the attention module it prepares with :data:`_QUERY_MARK`).
QUERY_HEADS: contextvars.ContextVar[bool] = contextvars.ContextVar("submod_query_heads", default=False)
_QUERY_MARK = "_submod_query_heads"
#: The query heads per key/value head of an attention when it was first prepared for head pruning (its groups as
#: trained, or as loaded), recorded on the module by :meth:`_HFLlamaBlock.prepare_heads`.
_GROUPS_MARK = "_submod_trained_kv_groups"


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a head-major projection."""
    return (heads.view(-1, 1) * head_dim + torch.arange(head_dim, device=heads.device).view(1, -1)).reshape(-1)


class _Block:
    """Common interface of one transformer block (see module docstring)."""

    kind: str
    #: Whether each block is called with arguments of its own, replayed as captured from the unpruned model (T5's
    #: relative position bias, computed by the first block and handed on); else every block takes the first's.
    per_block_context = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    # --- running -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | None:
        """(module, positional index) whose input is the residual stream that the stage's consumer output is
        added to; ``None``: the block input itself (the case of the attention stage); :data:`BLOCK_OUTPUT`: the
        stage's output is summed straight into the block output, and the residual is the block output minus it
        (the parallel attention and FFN of GPT-J, GPT-NeoX and Phi); a :class:`BranchSum`: the residual is the
        input it names minus the stage's output."""
        return None

    def residual_scale(self, stage: str) -> float | None:
        """A number the residual read at :meth:`residual_input` is multiplied by before the stage's sum (MiniMax's
        ``attn_alpha_factor``), or ``None``."""
        return None

    def post_norm(self, stage: str) -> nn.LayerNorm | None:
        """The LayerNorm applied right after the stage's residual sum (post-LN), or ``None`` (pre-LN)."""
        return None

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        """(module, positional index) whose input is the attention's residual sum in a pre-LN block, read by the
        layout check: the FFN's residual input, where the FFN comes next."""
        entry = self.residual_input("ffn")
        return entry if isinstance(entry, tuple) else None

    def output_scale(self, stage: str) -> torch.Tensor | None:
        """Per-channel factor applied to the stage's consumer output before the residual sum (a layer scale, as
        in DINOv2 and CaiT), or ``None``."""
        return None

    def last_sum_probe(self) -> tuple[nn.Module, int] | None:
        """(module, positional index) whose input is the residual sum of the block's last sublayer, where the block
        does more after it (Gemma 4's per-layer input, added after the FFN's sum); ``None``: the block output, over
        :meth:`output_factor`."""
        return None

    def output_factor(self) -> torch.Tensor | None:
        """A factor the block multiplies its output by after its last residual sum (Gemma 4's ``layer_scalar``), or
        ``None``."""
        return None

    def output_norm(self, stage: str) -> nn.Module | None:
        """The RMS norm applied to the stage's consumer output before the residual sum (the "sandwich" norms of
        Gemma 2 and 3, OLMo 2: ``x + post_feedforward_layernorm(mlp(x))``), or ``None``."""
        return None

    def single_call(self) -> bool:
        """Whether each consumer is called once per block forward (so a capture may stop early)."""
        return True

    def batch_first(self, stage: str = "block") -> bool:
        """Whether tensors of ``stage`` ("block", "ffn" or "heads") are laid out (batch, tokens, features)."""
        return True

    def token_view(self, x: torch.Tensor) -> torch.Tensor:
        """The block's input or output ``x`` as ``(batch, tokens, features)`` where the block is batch first: a grid of
        tokens ``(batch, height, width, features)`` (SAM's image encoder) flattened; blocks that take their grid
        channels first (ViTDet) say so here."""
        return x.flatten(1, -2) if self.batch_first("block") and x.dim() > 3 else x

    def consumer_rows(self, stage: str, t: torch.Tensor, ctx: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """The input ``t`` of the stage's consumer, as captured in a forward of the block on ``x`` with the call
        context ``ctx``, laid out like the block's tokens (:meth:`batch_first`): ``t`` itself, except where the
        block regroups its tokens before the consumer (windows: :class:`_Windowed`, :class:`_HFSamVisionBlock`)."""
        return t

    # --- FFN -----------------------------------------------------------------------------------------------
    @property
    def up(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def down(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def producers(self) -> list[nn.Linear]:
        """The layers whose output rows are the FFN units: ``[up]``, or ``[gate, up]`` for a gated FFN whose down
        projection reads ``act(gate(x)) * up(x)`` (unit ``i`` is row ``i`` of both)."""
        return [self.up]

    #: Row blocks per producer: 1, or 2 for one projection that stacks the gate rows then the up rows (Phi-3,
    #: GLM: ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``, unit ``i`` is its rows ``i`` and ``units + i``).
    FFN_PARTS = 1

    @property
    def gated(self) -> bool:
        """Whether a unit is more than one producer row (a gated FFN, fused or not)."""
        return len(self.producers) * self.FFN_PARTS > 1

    @property
    def ffn_units_checked(self) -> bool:
        """Whether the FFN's unit layout is checked on the first batch (removing a unit must equal zeroing its
        down-projection column): a gated FFN, or one with per-unit parts between its projections (SegFormer's
        depthwise convolution)."""
        return self.gated

    @property
    def ffn_units(self) -> int:
        """Number of FFN units (columns of the down projection's input)."""
        return int(weight_of(self.up).shape[0]) // self.FFN_PARTS

    def ffn_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """Rows of each producer that belong to the units ``keep``, in the producer's row order."""
        units = self.ffn_units
        return torch.cat([keep + part * units for part in range(self.FFN_PARTS)])

    def set_ffn(self, producers: list[nn.Linear], down: nn.Linear) -> None:  # pragma: no cover - abstract
        """Put new producers (in the order of :attr:`producers`) and a new down projection in place."""
        raise NotImplementedError

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        """Keep intermediate neurons ``keep`` (sorted); new down weights (out, len(keep)) if given."""
        down = self.down
        keep = _index_to(keep, down.weight)
        rows = self.ffn_rows(keep)
        new = [_linear_like(p, weight_of(p)[rows], None if p.bias is None else p.bias[rows]) for p in self.producers]
        w = weight_of(down)[:, keep] if down_weight is None else down_weight
        b = down.bias if down_weight is None else down_bias
        self.set_ffn(new, _linear_like(down, w, b))

    def prepare_ffn(self) -> None:
        """Refuse an FFN whose units cannot be removed row by row (a ``ValueError`` naming the fix)."""

    #: Whether the FFN is a mixture of experts (:class:`_HFMoEBlock`): per-expert statistics and selections.
    moe = False
    #: FFN units are kept in multiples of this (see :attr:`_HFMoEBlock.unit_multiple`).
    unit_multiple = 1

    def for_probe(self) -> None:
        """Prepare a deep copy of the block for a unit-removal check (nothing to do for most blocks)."""

    def zero_ffn_unit(self, unit: int) -> None:
        """Zero FFN unit ``unit``'s consumer columns in place (what removing it must be equivalent to)."""
        weight_of(self.down)[:, unit] = 0.0

    def drop_first_ffn_unit(self) -> None:
        """Remove FFN unit 0 (what :meth:`zero_ffn_unit` of unit 0 must be equivalent to)."""
        self.shrink_ffn(torch.arange(1, self.ffn_units))

    def extra_sizes_problem(self, spec: Mapping[str, Any]) -> str | None:
        """What is wrong with the sizes of a block's pruning spec beyond ``intermediate_size`` and ``num_heads``
        for this block (here: the heads of its cross-attention, ``cross_num_heads``), or ``None``."""
        n, cross = spec.get("cross_num_heads"), self.cross
        if n is None or (cross is not None and isinstance(n, int) and not isinstance(n, bool)
                         and 1 <= n <= cross.num_heads):
            return None
        have = "no cross-attention" if cross is None else f"a cross-attention of {cross.num_heads} heads"
        return f"the spec has cross_num_heads={n!r}, the model's block {have}"

    def plan_sizes(self, spec: Mapping[str, Any]) -> None:
        """Read what :meth:`set_sizes` needs from the block's spec beyond its two sizes (called just before it;
        here: nothing)."""

    def set_extra_sizes(self, spec: Mapping[str, Any]) -> None:
        """Apply those sizes (checked by :meth:`extra_sizes_problem`)."""
        n, cross = spec.get("cross_num_heads"), self.cross
        if n is not None and cross is not None and n < cross.num_heads:
            cross.prepare_heads()
            cross.shrink_heads(torch.arange(int(n)))

    # --- heads ---------------------------------------------------------------------------------------------
    num_heads: int
    head_dim: int

    def prepare_heads(self) -> None:
        """Make the attention prunable (torch: swap in :class:`PrunedMultiheadAttention`, exact)."""

    def unprepare_heads(self) -> None:
        """Undo :meth:`prepare_heads` where every head is still there (torch: the original module type, exact)."""

    @property
    def out_proj(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def head_units(self) -> int:
        """Number of attention units: heads, or key/value groups under grouped-query attention."""
        return self.num_heads

    #: The attention units fall into this many equal consecutive parts, each of which must keep as many units
    #: (CodeGen's model-parallel blocks of its fused projection; the key/value groups when query heads are pruned,
    #: :data:`QUERY_HEADS`): units are kept in multiples of it, selected under a partition matroid (at most
    #: ``k / head_parts`` from each part).
    head_parts = 1
    #: Whether the attention units are query heads within key/value groups (see :data:`QUERY_HEADS`).
    query_heads = False

    def head_part_labels(self) -> np.ndarray:
        """The part (``0 .. head_parts - 1``) of every attention unit (see :attr:`head_parts`)."""
        return np.arange(self.head_units) // (self.head_units // self.head_parts)

    @property
    def head_unit_width(self) -> int:
        """Columns of the output projection's input per attention unit (consecutive, unit-major)."""
        return self.head_dim

    @property
    def value_dim(self) -> int:
        """Width of one head's values, i.e. of its output-projection columns: ``head_dim`` in most layouts."""
        return self.head_dim

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:  # pragma: no cover - abstract
        """Keep attention units ``keep`` (sorted); new output-projection weights (out, kept columns) if given."""
        raise NotImplementedError

    #: The decoder layer's cross-attention seen as a block of its own (its heads are the "cross" stage), or
    #: ``None``: see :attr:`_HFBartBlock.cross`.
    cross: _Block | None = None
    #: Whether the block has attention heads (a hybrid model's convolution layers have none: no "heads" stage).
    has_heads = True
    #: Whether the block has an FFN (NemotronH's attention layers have none: no "ffn" stage).
    has_ffn = True
    #: The layers of the block's stack between the previous block and this one that the adapter does not recognise
    #: (:class:`OpaqueLayer`, run as they are), set by :func:`link_opaque_layers`; empty for most models.
    before: tuple[OpaqueLayer, ...] = ()

    def spec(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "intermediate_size": self.ffn_units,
               "num_heads": self.num_heads, "head_dim": self.head_dim}
        if self.cross is not None:
            out["cross_num_heads"] = self.cross.num_heads
        return out


def _get(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for ``path == "a.b"`` (``None`` when a part is missing)."""
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(_get(module, owner), leaf, value)


class _HFBlock(_Block):
    """A Hugging Face encoder layer described by the paths of its parts (one subclass per layout)."""

    #: Paths, relative to the layer, of the self-attention, its query/key/value (names inside it), the attention
    #: output projection, the FFN up and down projections, the LayerNorms after the two residual sums (post-LN;
    #: a missing one means pre-LN) and the module whose positional input ``RESID_FFN[1]`` is the FFN's residual.
    SA: str
    QKV: tuple[str, str, str]
    OUT: str
    UP: str
    DOWN: str
    #: The gate projection of a gated FFN (``down(act(gate(x)) * up(x))``), or ``None`` for a plain FFN.
    GATE: str | None = None
    NORM_HEADS: str
    NORM_FFN: str
    RESID_FFN: tuple[str, int]
    #: Head bookkeeping attributes of the self-attention (``ALL_HEADS``: the inner width, if the layout keeps one).
    N_HEADS = "num_attention_heads"
    HEAD_SIZE = "attention_head_size"
    ALL_HEADS: str | None = "all_head_size"
    #: Where ``chunk_size_feed_forward`` lives (the FFN is then called once per chunk).
    CHUNK = ""
    #: Layer-scale modules (their ``lambda1`` multiplies the consumer output before the residual sum), if any.
    SCALE_HEADS: str | None = None
    SCALE_FFN: str | None = None
    #: Children of the self-attention that act per head or not at all on the head layout.
    PLAIN: frozenset[str] = frozenset({"dropout"})

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        return (
            sa is not None
            and all(isinstance(getattr(sa, n, None), nn.Linear) for n in cls.QKV)
            and all(isinstance(_get(module, p), nn.Linear) for p in (cls.OUT, cls.UP, cls.DOWN))
            and (cls.GATE is None or isinstance(_get(module, cls.GATE), nn.Linear))
            and (cls.FFN_PARTS == 1
                 or _get(module, cls.UP).out_features == cls.FFN_PARTS * _get(module, cls.DOWN).in_features)
            and isinstance(_get(module, cls.RESID_FFN[0]), nn.Module)
            # it must take the residual: BEiT's output module in transformers 4 has ViT's name but one input
            and _takes_positional(_get(module, cls.RESID_FFN[0]), cls.RESID_FFN[1] + 1)
            and hasattr(sa, cls.HEAD_SIZE) and (not cls.N_HEADS or hasattr(sa, cls.N_HEADS))
            and all(isinstance(getattr(_get(module, p), "lambda1", None), torch.Tensor)
                    for p in (cls.SCALE_HEADS, cls.SCALE_FFN) if p is not None)
        )

    def single_call(self) -> bool:
        return not getattr(_get(self.module, self.CHUNK), "chunk_size_feed_forward", 0)

    @property
    def ffn_units_checked(self) -> bool:
        """Also where the FFN's container (the module holding both projections, ``mlp``) has parts with
        parameters besides them, which may act on the units between the projections (SegFormer's depthwise
        convolution, a norm over the intermediate features): the first batch's check then says whether a unit
        can be removed alone."""
        if not self.has_ffn or self.moe or not (isinstance(self.UP, str) and isinstance(self.DOWN, str)):
            return self.has_ffn and self.gated
        parent = self.UP.rpartition(".")[0]
        container = _get(self.module, parent) if parent and parent == self.DOWN.rpartition(".")[0] else None
        if self.gated or container is None:
            return self.gated
        known = {id(p) for p in self.producers} | {id(self.down)}
        return any(id(c) not in known and any(True for _ in c.parameters()) for c in container.children())

    def post_norm(self, stage: str) -> nn.LayerNorm | None:
        norm = _get(self.module, self.NORM_FFN if stage == "ffn" else self.NORM_HEADS)
        return norm if isinstance(norm, nn.LayerNorm) else None

    def output_scale(self, stage: str) -> torch.Tensor | None:
        path = self.SCALE_FFN if stage == "ffn" else self.SCALE_HEADS
        return None if path is None else _get(self.module, path).lambda1.detach()

    def prepare_heads(self) -> None:
        sa = _get(self.module, self.SA)
        plain = self.PLAIN | set(self.QKV) | {self.OUT.rpartition(".")[2] if self.OUT.startswith(self.SA + ".")
                                              else ""}
        extra = sorted(n for n, m in sa.named_children() if n not in plain and not self._per_head_part(m))
        if extra:
            raise ValueError(f"block {self.name!r}: its self-attention ({type(sa).__name__}) has parts besides "
                             f"query/key/value ({', '.join(extra)}) that head pruning does not know how to shrink; "
                             "prune target='ffn' on this model.")

    def _per_head_part(self, module: nn.Module) -> bool:
        """Whether a child of the self-attention holds only ``head_dim``-wide vectors (a norm of each head's queries
        or keys, shared by the heads, under another name than :attr:`PLAIN`'s: HunYuan's ``query_layernorm`` and
        ``key_layernorm``): removing heads leaves it as it is. The unit-removal check on the first batch confirms
        that it acts per head (a norm over the whole width would fail or differ there)."""
        params = list(module.parameters())
        return (bool(params) and not any(True for _ in module.children())
                and all(p.dim() == 1 and p.numel() == self.head_dim for p in params))

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | None:
        return (_get(self.module, self.RESID_FFN[0]), self.RESID_FFN[1]) if stage == "ffn" else None

    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        out = self.module(x, *ctx["args"], **ctx["kwargs"])
        return out[0] if isinstance(out, tuple) else out

    @property
    def up(self) -> nn.Linear:
        return _get(self.module, self.UP)

    @property
    def down(self) -> nn.Linear:
        return _get(self.module, self.DOWN)

    @property
    def producers(self) -> list[nn.Linear]:
        return [self.up] if self.GATE is None else [_get(self.module, self.GATE), self.up]

    def set_ffn(self, producers: list[nn.Linear], down: nn.Linear) -> None:
        paths = [self.UP] if self.GATE is None else [self.GATE, self.UP]
        for path, lin in zip(paths, producers, strict=True):
            _set(self.module, path, lin)
        _set(self.module, self.DOWN, down)

    @property
    def num_heads(self) -> int:
        return int(getattr(_get(self.module, self.SA), self.N_HEADS))

    @property
    def head_dim(self) -> int:
        return int(getattr(_get(self.module, self.SA), self.HEAD_SIZE))

    @property
    def out_proj(self) -> nn.Linear:
        return _get(self.module, self.OUT)

    def qkv_weights(self) -> list[torch.Tensor]:
        sa = _get(self.module, self.SA)
        return [getattr(sa, n).weight for n in self.QKV if getattr(sa, n) is not None]

    def _cut_attention(self, rows: tuple[torch.Tensor, ...], cols: torch.Tensor, out_weight: torch.Tensor | None,
                       out_bias: torch.Tensor | None) -> None:
        """Keep rows ``rows[i]`` of the projection ``QKV[i]`` and columns ``cols`` of the output projection (or
        give it ``out_weight`` and ``out_bias``)."""
        sa = _get(self.module, self.SA)
        for name, r in zip(self.QKV, rows, strict=True):
            lin = getattr(sa, name, None)
            if lin is None:  # a projection the layer does without (Gemma 4's values taken from the keys, or its
                continue  # layers that reuse an earlier layer's keys and values)
            setattr(sa, name, _linear_like(lin, weight_of(lin)[r], None if lin.bias is None else lin.bias[r]))
        out = self.out_proj
        w = weight_of(out)[:, cols] if out_weight is None else out_weight
        b = out.bias if out_weight is None else out_bias
        _set(self.module, self.OUT, _linear_like(out, w, b))

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        rows = _head_rows(_index_to(keep, self.out_proj.weight), self.head_dim)
        self._cut_attention((rows, rows, rows), rows, out_weight, out_bias)
        setattr(sa, self.N_HEADS, int(keep.numel()))
        if self.ALL_HEADS is not None and hasattr(sa, self.ALL_HEADS):
            setattr(sa, self.ALL_HEADS, int(keep.numel()) * self.head_dim)

    def set_sizes(self, intermediate_size: int, num_heads: int) -> None:
        """Give the block the shapes of a pruned one (weights to be loaded from a state dict); ``num_heads`` counts
        query heads. A checkpoint with fewer heads is refused where head pruning is (it could not run)."""
        per_unit = self.head_unit_width // self.value_dim
        if num_heads % per_unit:
            raise ValueError(f"block {self.name!r}: {num_heads} query heads are not whole attention units of "
                             f"{per_unit} heads: the spec does not come from this architecture")
        self.shrink_ffn(torch.arange(intermediate_size))
        if num_heads < self.num_heads:
            self.prepare_heads()
        self.shrink_heads(torch.arange(num_heads // per_unit))


class _HFBertBlock(_HFBlock):
    """BERT, RoBERTa, ELECTRA, MiniLM... (``BertLayer`` and look-alikes); post-LN, or pre-LN without the
    LayerNorms after the sums (MegatronBERT, XLM-RoBERTa-XL, ESM)."""

    kind = "hf_bert"
    SA, QKV, OUT = "attention.self", ("query", "key", "value"), "attention.output.dense"
    UP, DOWN = "intermediate.dense", "output.dense"
    NORM_HEADS, NORM_FFN = "attention.output.LayerNorm", "output.LayerNorm"
    # BertOutput.forward(hidden_states, input_tensor): LayerNorm(dense(hidden) + input_tensor)
    RESID_FFN = ("output", 1)
    PLAIN = frozenset({"dropout", "distance_embedding"})


class _HFAlbertBlock(_HFBlock):
    """ALBERT's layer (``AlbertLayer``): BERT's post-LN order under other names, ``attention.{query,key,value,
    dense}`` and ``attention.LayerNorm``, FFN ``ffn`` / ``ffn_output``, ``full_layer_layer_norm``. The model
    applies one such layer (per group) to its own outputs ``num_hidden_layers`` times: it is pruned once for all
    its calls, from the statistics of every call, in ``layer`` mode (see ``_check_shared_calls`` in
    :mod:`nn_adapters.transformer`)."""

    kind = "hf_albert"
    SA, QKV, OUT = "attention", ("query", "key", "value"), "attention.dense"
    UP, DOWN = "ffn", "ffn_output"
    NORM_HEADS, NORM_FFN = "attention.LayerNorm", "full_layer_layer_norm"
    RESID_FFN = ("ffn", 0)  # full_layer_layer_norm(ffn_output(act(ffn(a))) + a)
    PLAIN = frozenset({"attention_dropout", "output_dropout", "LayerNorm"})


class _HFDebertaV2Block(_HFBertBlock):
    """DeBERTa-v2 and v3 (``DebertaV2Layer``): BERT's layout with ``attention.self.{query,key,value}_proj``. The
    relative-position terms project the shared position embeddings through the same query and key projections
    (``share_att_key``, DeBERTa-v3's setting), so they lose the removed heads' rows with them; without
    ``share_att_key``, through projections of their own, ``pos_key_proj`` / ``pos_query_proj``, with one row block
    of ``head_dim`` per head, which lose the same rows."""

    kind = "hf_deberta_v2"
    QKV = ("query_proj", "key_proj", "value_proj")
    #: Projections of the relative embeddings with one row block of ``head_dim`` per head.
    POS_PROJ: tuple[str, ...] = ("pos_key_proj", "pos_query_proj")
    PLAIN = frozenset({"dropout", "pos_dropout", *POS_PROJ})

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        self._cut_position_projections(keep)

    def _cut_position_projections(self, keep: torch.Tensor) -> None:
        """Keep the rows of the heads ``keep`` in the projections of the relative embeddings the layer has."""
        sa = _get(self.module, self.SA)
        rows = _head_rows(_index_to(keep, self.out_proj.weight), self.head_dim)
        for name in self.POS_PROJ:
            lin = getattr(sa, name, None)
            if isinstance(lin, nn.Linear):
                setattr(sa, name, _linear_like(lin, weight_of(lin)[rows], None if lin.bias is None else lin.bias[rows]))


class _HFDebertaBlock(_HFDebertaV2Block):
    """DeBERTa (v1, ``DebertaLayer``, e.g. microsoft/deberta-base): BERT's layout with the query, key and value
    fused head by head in ``attention.self.in_proj`` (rows ``3 h d ... 3 (h + 1) d - 1`` are head ``h``'s query,
    key and value rows, as its ``transpose_for_scores(in_proj(x)).chunk(3, -1)`` reads them), without a bias: the
    query and value biases are the parameters ``q_bias`` and ``v_bias`` (one block of ``d`` per head), and the
    relative-position projections of the shared relative embeddings, ``pos_proj`` (content-to-position keys) and
    ``pos_q_proj`` (position-to-content queries), have one row block per head. Its LayerNorms are
    ``DebertaLayerNorm`` (a LayerNorm computed in float32, ``variance_epsilon``). Talking heads
    (``talking_head``: ``head_logits_proj`` and ``head_weights_proj`` mix the heads' scores) are refused for heads."""

    kind = "hf_deberta"
    QKV = ("in_proj",)
    POS_PROJ = ("pos_proj", "pos_q_proj")
    PLAIN = frozenset({"dropout", "pos_dropout", *POS_PROJ})
    #: The query's and the value's biases (``in_proj`` has none), one block of ``head_dim`` per head.
    HEAD_BIASES = ("q_bias", "v_bias")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        return (super().matches(module) and type(_get(module, cls.NORM_FFN)).__name__ == "DebertaLayerNorm"
                and all(isinstance(getattr(sa, n, None), nn.Parameter) for n in cls.HEAD_BIASES))

    def post_norm(self, stage: str) -> nn.Module | None:
        return _get(self.module, self.NORM_FFN if stage == "ffn" else self.NORM_HEADS)

    def prepare_heads(self) -> None:
        sa = _get(self.module, self.SA)
        if any(getattr(sa, n, None) is not None for n in ("head_logits_proj", "head_weights_proj")):
            raise ValueError(f"block {self.name!r}: its attention uses talking heads (head_logits_proj / "
                             "head_weights_proj mix the heads' attention scores), so a head cannot be removed "
                             "without changing the others; prune target='ffn' on this model.")
        super().prepare_heads()

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        keep = _index_to(keep, self.out_proj.weight)
        rows = _head_rows(keep, self.head_dim)
        self._cut_attention((_head_rows(keep, 3 * self.head_dim),), rows, out_weight, out_bias)
        for name in self.HEAD_BIASES:
            p = getattr(sa, name)
            setattr(sa, name, _sliced_parameter(p, rows))
        self._cut_position_projections(keep)
        sa.num_attention_heads = int(keep.numel())
        sa.all_head_size = int(keep.numel()) * self.head_dim


class _HFLongformerBlock(_HFBertBlock):
    """Longformer (``LongformerLayer``): BERT's layout, its attention keeping ``num_heads`` / ``head_dim`` and extra
    projections for the global tokens (``{query,key,value}_global``). The FFN is pruned; heads are refused: the
    attention reshapes its output to the width of its input (``embed_dim``), which fewer heads cannot fill."""

    kind = "hf_longformer"
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", None

    def prepare_heads(self) -> None:
        raise ValueError(f"block {self.name!r}: {type(_get(self.module, self.SA)).__name__} reshapes its output to "
                         "the model width, which fewer heads cannot fill, so heads cannot be removed from it; prune "
                         "target='ffn' on this model.")


class _PerHeadBias(_HFBlock):
    """A bias with one channel per head that the model builds once for all its heads and hands to every layer
    (ALiBi). A layer that loses heads keeps the indices of the original heads it has left in the buffer
    ``kept_heads`` of its attention (saved with the weights), and a forward pre-hook picks their channels of the
    bias, as for MPNet's relative position bias."""

    #: The attention's argument that carries the bias and where its heads are: ``"batch*heads"`` (the first axis,
    #: batch-major, as BLOOM's ALiBi) or the axis of the heads; ``None``: no such bias.
    HEAD_BIAS: tuple[str, str | int] | None = None

    def _head_bias(self) -> tuple[str, str | int] | None:
        return self.HEAD_BIAS

    def _keep_bias_channels(self, heads: torch.Tensor, n_before: int) -> None:
        """After removing heads: record the original indices of the kept ``heads`` (indices into the heads before
        this removal) and have the bias sliced to them."""
        bias = self._head_bias()
        sa = _get(self.module, self.SA)
        held = getattr(sa, "kept_heads", None)
        if bias is None or (held is None and heads.numel() == n_before):
            return  # no such bias, or every head kept: the layer stays as it was
        heads = _index_to(heads, self.out_proj.weight).long()
        sa.register_buffer("kept_heads", heads.clone() if held is None else held[heads])
        sa.head_bias = bias
        if not any(h is _per_head_bias for h in sa._forward_pre_hooks.values()):
            sa.register_forward_pre_hook(_per_head_bias, with_kwargs=True)


def _per_head_bias(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook of an attention that lost heads: keep its heads' channels of the per-head bias (see
    :class:`_PerHeadBias`), passed by name or positionally."""
    name, layout = module.head_bias
    at = _position(module, name)
    by_name = name in kwargs
    value = kwargs.get(name) if by_name else (args[at] if at is not None and len(args) > at else None)
    if value is None:
        return args, kwargs
    keep = module.kept_heads.to(value.device)
    if layout == "batch*heads":
        batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
        value = value.reshape(batch, -1, *value.shape[1:])[:, keep].reshape(-1, *value.shape[1:])
    else:
        value = value.index_select(int(layout), keep)
    if by_name:
        return args, {**kwargs, name: value}
    return (*args[:at], value, *args[at + 1:]), kwargs


class _HFMPNetBlock(_PerHeadBias, _HFBertBlock):
    """MPNet (``MPNetLayer``, e.g. all-mpnet-base-v2): the BERT layout with ``attention.attn.{q,k,v,o}`` and the
    attention's LayerNorm at ``attention.LayerNorm``. Its attention adds a relative position bias with one channel
    per head (axis 1), computed once for all layers by the encoder: a layer that loses heads takes its heads'
    channels (:class:`_PerHeadBias`; the buffer ``attention.attn.kept_heads``)."""

    kind = "hf_mpnet"
    SA, QKV, OUT = "attention.attn", ("q", "k", "v"), "attention.attn.o"
    NORM_HEADS = "attention.LayerNorm"
    PLAIN = frozenset({"dropout"})
    HEAD_BIAS = ("position_bias", 1)

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        n_before = self.num_heads
        super().shrink_heads(keep, out_weight, out_bias)
        self._keep_bias_channels(keep, n_before)


def _position(module: nn.Module, name: str) -> int | None:
    """Index of the argument ``name`` among the positional arguments of ``module.forward`` (``None``: it has none)."""
    positional = _positional_names(type(module))
    return positional.index(name) if name in positional else None


def leading_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's ``(args, kwargs)`` with its first input moved into ``args`` where the caller passed it by name
    (``layer(hidden_states=x)``, as some encoders of transformers 4 do)."""
    names = _positional_names(type(module))
    if args or not names or names[0] not in kwargs:
        return args, kwargs
    rest = dict(kwargs)
    return (rest.pop(names[0]),), rest


def _takes_positional(module: nn.Module, n: int) -> bool:
    """Whether ``module.forward`` accepts ``n`` positional arguments."""
    params = inspect.signature(type(module).forward).parameters.values()
    return len(_positional_names(type(module))) >= n or any(p.kind is p.VAR_POSITIONAL for p in params)


@functools.cache
def _positional_names(cls: type[nn.Module]) -> tuple[str, ...]:
    """Names of the positional arguments of ``cls.forward`` after ``self`` (read once per class)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


class _HFPreLNProjBlock(_HFBlock):
    """The ``q_proj / k_proj / v_proj / o_proj`` + ``mlp.fc1 / fc2`` pre-LN layout of transformers 5."""

    QKV = ("q_proj", "k_proj", "v_proj")
    UP, DOWN = "mlp.fc1", "mlp.fc2"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN: no LayerNorm after the sums
    HEAD_SIZE, ALL_HEADS = "head_dim", None


class _HFViTBlock(_HFPreLNProjBlock):
    """ViT, DeiT and look-alikes (``ViTLayer``: ``attention.{q,k,v,o}_proj``, ``layernorm_before/after``; the
    layout of transformers >= 5.9)."""

    kind = "hf_vit"
    SA, OUT = "attention", "attention.o_proj"
    RESID_FFN = ("layernorm_after", 0)  # x + mlp(layernorm_after(x))


class _BeitLambdas:
    """BEiT's layer scales, the layer's own ``lambda_1`` (attention) and ``lambda_2`` (FFN): per-channel factors of
    the consumer outputs before the sums (a plain 1.0 where ``layer_scale_init_value`` is 0), in either layout."""

    module: nn.Module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return hasattr(module, "lambda_1") and hasattr(module, "lambda_2") and super().matches(module)  # type: ignore[misc]

    def output_scale(self, stage: str) -> torch.Tensor | None:
        lam = getattr(self.module, "lambda_2" if stage == "ffn" else "lambda_1")
        return lam.detach() if isinstance(lam, torch.Tensor) else None


class _HFBeitBlock(_BeitLambdas, _HFViTBlock):
    """BEiT layers in transformers 5's layout (``BeitLayer``: ViT's parts ``attention.{q,k,v,o}_proj``,
    ``mlp.fc1/fc2``, ``layernorm_before/after``, pre-LN), whose layer scales are the layer's own parameters
    ``lambda_1`` / ``lambda_2`` (a plain 1.0 where ``layer_scale_init_value`` is 0), and whose relative position
    bias, where the layer has one (``relative_position_bias``: a table of one column per head, added to the
    attention scores), loses the removed heads' columns. A bias shared by all layers
    (``use_shared_relative_position_bias``, built by the model with every head) cannot lose heads in one layer:
    the first-batch head check refuses it."""

    kind = "hf_beit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return hasattr(module, "relative_position_bias") and super().matches(module)

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        _keep_bias_table_columns(self.module.relative_position_bias, keep)


class _HFViTLegacyBlock(_HFBlock):
    """ViT, DeiT and look-alikes in the layout of transformers < 5.9 (``ViTLayer``: ``attention.attention.{query,
    key,value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, pre-LN), where the FFN's
    output module adds the residual: ``output(intermediate(layernorm_after(x)), x)``."""

    kind = "hf_vit"
    SA, QKV, OUT = "attention.attention", ("query", "key", "value"), "attention.output.dense"
    UP, DOWN = "intermediate.dense", "output.dense"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN: no LayerNorm after the sums
    RESID_FFN = ("output", 1)  # ViTOutput.forward(hidden_states, input_tensor): dense(hidden_states) + input_tensor


class _DepthwiseFFN:
    """An FFN whose units pass through a depthwise convolution between the up projection and the activation (the
    Mix-FFN of SegFormer and PVT v2, ``DWCONV``: a module holding an ``nn.Conv2d`` with one group per channel):
    unit ``i`` is row ``i`` of the up projection, channel ``i`` of the convolution and column ``i`` of the down
    projection, which the first batch's unit-removal check confirms (see ``_HFBlock.ffn_units_checked``)."""

    DWCONV: str
    UP: str
    module: nn.Module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        conv = cls._conv_of(module)
        up = _get(module, cls.UP)
        return (conv is not None and isinstance(up, nn.Linear) and conv.groups == conv.in_channels
                == conv.out_channels == up.out_features and super().matches(module))  # type: ignore[misc]

    @classmethod
    def _conv_of(cls, module: nn.Module) -> nn.Conv2d | None:
        part = _get(module, cls.DWCONV)
        conv = getattr(part, "dwconv", part)
        return conv if isinstance(conv, nn.Conv2d) else None

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        conv = self._conv_of(self.module)
        super().shrink_ffn(keep, down_weight, down_bias)  # type: ignore[misc]
        keep = _index_to(keep, conv.weight)
        n = int(keep.numel())
        new = _uninitialised(lambda: nn.Conv2d(n, n, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                               groups=n, bias=conv.bias is not None, padding_mode=conv.padding_mode),
                             conv.weight)
        with torch.no_grad():
            new.weight.copy_(conv.weight[keep])
            if conv.bias is not None:
                new.bias.copy_(conv.bias[keep])
        new.train(conv.training)
        _same_grad_flags(new, conv)
        part = _get(self.module, self.DWCONV)
        if part is conv:
            _set(self.module, self.DWCONV, new)
        else:
            part.dwconv = new


class _HFSegformerBlock(_DepthwiseFFN, _HFViTBlock):
    """SegFormer's (Mix Transformer) layers in transformers 5's layout (``SegformerLayer``): ViT's pre-LN parts,
    the keys and values computed from a spatially reduced copy of the tokens (``attention.sequence_reduction``: a
    strided convolution and a LayerNorm over the model width, before the projections, which head pruning leaves as
    they are), and a Mix-FFN (``mlp.fc1``, ``mlp.dwconv``, ``mlp.fc2``: :class:`_DepthwiseFFN`). The stages are
    linked through their patch embeddings, which read the tokens laid out as an image (see ``_link_stages`` in
    :mod:`nn_adapters.transformer`)."""

    kind = "hf_segformer"
    PLAIN = frozenset({"dropout", "sequence_reduction"})
    DWCONV = "mlp.dwconv"


class _HFPvtBlock(_HFBlock):
    """PVT's layers (``PvtLayer``): BERT's older part names in a pre-LN layer, ``attention.self.{query,key,value}``
    with keys and values from a spatially reduced copy of the tokens (``sequence_reduction``, ``layer_norm``: over
    the model width, before the projections), ``attention.output.dense``, ``mlp.dense1 / dense2``,
    ``layer_norm_1 / layer_norm_2``. The stages are linked like SegFormer's."""

    kind = "hf_pvt"
    SA, QKV, OUT = "attention.self", ("query", "key", "value"), "attention.output.dense"
    UP, DOWN = "mlp.dense1", "mlp.dense2"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    RESID_FFN = ("layer_norm_2", 0)
    PLAIN = frozenset({"dropout", "sequence_reduction", "layer_norm"})


class _HFPvtV2Block(_DepthwiseFFN, _HFBlock):
    """PVT v2's layers (``PvtV2BlockLayer``): ``attention.{query,key,value,proj}`` with keys and values from a
    spatially reduced copy of the tokens, ``layer_norm_1 / layer_norm_2`` (pre-LN), and a Mix-FFN ``mlp.dense1``,
    ``mlp.dwconv``, ``mlp.dense2`` (:class:`_DepthwiseFFN`). The FFN is pruned; heads are refused: the attention
    reshapes its output to the model width. The stages are linked like SegFormer's."""

    kind = "hf_pvt_v2"
    SA, QKV, OUT = "attention", ("query", "key", "value"), "attention.proj"
    UP, DOWN = "mlp.dense1", "mlp.dense2"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    RESID_FFN = ("layer_norm_2", 0)
    DWCONV = "mlp.dwconv"

    def prepare_heads(self) -> None:
        raise ValueError(f"block {self.name!r} ({type(self.module).__name__}): PVT v2's attention reshapes its output "
                         "to the model width, which fewer heads cannot fill; prune target='ffn' on this model.")


class _Windowed:
    """Swin's layers (Swin, Donut's and MaskFormer's Swin, CLAP's audio encoder; Swin V2): ViT's pre-LN parts, with
    the attention computed in windows of the stage's token grid, shifted every other layer (``SwinLayer``: the layer
    has ``window_size``, ``shift_size`` and ``maybe_pad``). The FFN acts on each token and is pruned like ViT's. The
    attention's output projection sees the tokens regrouped: the grid padded to whole windows, rolled by the shift,
    cut into windows (``(batch * windows, window tokens, features)``); :meth:`consumer_rows` puts its input rows
    back in token order, without the padding, by running the layer's own padding and its module's
    ``window_partition`` on the grid of token numbers (which the first batch's layout check confirms: the projected
    rows plus the residual must give the sum the layer computes). Each head's relative position bias (a table
    column, or Swin V2's continuous bias and logit scale) goes with the head. The stages of the encoder are
    linked through their patch merging (see ``_link_stages`` in :mod:`nn_adapters.transformer`)."""

    module: nn.Module
    name: str

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (callable(getattr(module, "maybe_pad", None)) and hasattr(module, "shift_size")
                and hasattr(module, "window_size") and super().matches(module))  # type: ignore[misc]

    def prepare_heads(self) -> None:
        if not callable(getattr(sys.modules.get(type(self.module).__module__), "window_partition", None)):
            raise ValueError(f"block {self.name!r} ({type(self.module).__name__}) computes its attention in shifted "
                             "windows of the token grid, and its module has no window_partition function to read "
                             "the windows' token order from: head pruning does not support it; prune target='ffn' "
                             "on this model.")
        super().prepare_heads()  # type: ignore[misc]

    def consumer_rows(self, stage: str, t: torch.Tensor, ctx: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        if stage != "heads":
            return t
        dims = ctx["args"][0] if ctx["args"] else ctx["kwargs"].get("input_dimensions")
        if not (isinstance(dims, (tuple, list)) and len(dims) >= 2):
            raise ValueError(f"block {self.name!r} ({type(self.module).__name__}) is not called with the size of its "
                             f"token grid (input_dimensions, got {type(dims).__name__}), from which the order of its "
                             "windows' tokens is read: head pruning does not support it; prune target='ffn'.")
        return _tokens_in_order(t, int(dims[0]), int(dims[1]), self._cut_windows)

    def _cut_windows(self, grid: torch.Tensor) -> torch.Tensor:
        """The windows the layer cuts from a ``(1, height, width, 1)`` grid: its padding, shift and partition."""
        padded = self.module.maybe_pad(grid, grid.shape[1], grid.shape[2])[0]
        shift = int(self.module.shift_size)
        if shift > 0:
            padded = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2))
        return sys.modules[type(self.module).__module__].window_partition(padded, self.module.window_size)


def _tokens_in_order(t: torch.Tensor, height: int, width: int,
                     cut: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rows of windows ``t`` (``(batch * windows, ..., features)``, each sample's windows together) put back in the
    order of the ``height x width`` grid of tokens they were cut from, ``(batch, height * width, features)``, without
    the padding positions. ``cut`` is the layer's own cutting (padding, shift, partition) of a ``(1, height, width,
    1)`` grid: run on the grid of token numbers, it tells each window row's token (0 for padding)."""
    n_tokens = height * width
    grid = torch.arange(1, n_tokens + 1, dtype=torch.float64).view(1, height, width, 1)
    index = (cut(grid).reshape(-1).round().long() - 1).to(t.device)
    batch = t.numel() // t.shape[-1] // index.numel()
    rows = t.reshape(batch, index.numel(), t.shape[-1])
    real = index >= 0
    out = rows.new_empty(batch, n_tokens, t.shape[-1])
    out[:, index[real]] = rows[:, real]
    return out


class _HFSamVisionBlock(_HFBlock):
    """The image encoder's layers of SAM (``SamVisionLayer``; SAM-HQ's alike): a ViT whose tokens are a ``(batch,
    height, width, features)`` grid, pre-LN (``layer_norm1 / layer_norm2``), query, key and value fused in
    ``attn.qkv`` (all queries, then all keys, then all values, head by head), ``attn.proj``, ``mlp.lin1 / lin2``;
    most layers attend within windows of the grid (``window_size``, the grid padded to whole windows), a few
    globally. The decomposed relative positions (``rel_pos_h / rel_pos_w``) are ``head_dim`` wide, shared by the
    heads. The output projection's input rows of a windowed layer are put back in token order by running the
    layer's own ``window_partition`` on the grid of token numbers (confirmed by the first batch's layout check)."""

    kind = "hf_sam_vision"
    SA, QKV, OUT = "attn", ("qkv",), "attn.proj"
    UP, DOWN = "mlp.lin1", "mlp.lin2"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    RESID_FFN = ("layer_norm2", 0)
    N_HEADS, ALL_HEADS = "num_attention_heads", None

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        n = getattr(sa, cls.N_HEADS, None)
        return (cls._partition(module) is not None and isinstance(getattr(module, "window_size", None), int)
                and isinstance(getattr(sa, "qkv", None), nn.Linear) and isinstance(getattr(sa, "proj", None), nn.Linear)
                and isinstance(n, int) and n > 0 and sa.qkv.out_features % (3 * n) == 0
                and all(isinstance(_get(module, p), nn.Linear) for p in (cls.UP, cls.DOWN))
                and isinstance(_get(module, cls.RESID_FFN[0]), nn.Module))

    @staticmethod
    def _partition(module: nn.Module) -> Callable[..., Any] | None:
        """The layer's window partition: its own method (SAM)."""
        part = getattr(module, "window_partition", None)
        return part if callable(part) else None

    @property
    def head_dim(self) -> int:
        sa = _get(self.module, self.SA)
        return int(sa.qkv.out_features) // (3 * int(getattr(sa, self.N_HEADS)))

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        keep = _index_to(keep, self.out_proj.weight)
        width = self.num_heads * self.head_dim
        rows = _head_rows(keep, self.head_dim)
        self._cut_attention((torch.cat([rows, rows + width, rows + 2 * width]),), rows, out_weight, out_bias)
        setattr(_get(self.module, self.SA), self.N_HEADS, int(keep.numel()))

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid's height and width, from the block's input (channels last)."""
        return int(x.shape[1]), int(x.shape[2])

    def consumer_rows(self, stage: str, t: torch.Tensor, ctx: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        size = int(self.module.window_size)
        if stage != "heads" or size <= 0:
            return t
        partition = self._partition(self.module)
        return _tokens_in_order(t, *self._grid(x), lambda grid: partition(grid, size)[0])


class _HFVitDetBlock(_HFSamVisionBlock):
    """ViTDet's layers (``VitDetLayer``, also VitMatte's backbone): SAM's image encoder layer under other names
    (``attention.qkv`` / ``attention.proj``, ``attention.num_heads``, ``norm1 / norm2``, ``mlp.fc1 / fc2``), its
    windows cut by its module's ``window_partition``, and its grid taken and handed on channels first, ``(batch,
    features, height, width)`` (:meth:`token_view`). A layer with a convolutional residual block after its sums
    (``use_residual_block``) fails the first batch's layout check and is refused."""

    kind = "hf_vitdet"
    SA, OUT = "attention", "attention.proj"
    UP, DOWN = "mlp.fc1", "mlp.fc2"
    RESID_FFN = ("norm2", 0)
    N_HEADS = "num_heads"

    @staticmethod
    def _partition(module: nn.Module) -> Callable[..., Any] | None:
        """The window partition of the layer's module (a function there, ViTDet's)."""
        part = getattr(sys.modules.get(type(module).__module__), "window_partition", None)
        return part if callable(part) else None

    def token_view(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return int(x.shape[2]), int(x.shape[3])


class _HFSwinBlock(_Windowed, _HFViTBlock):
    """Swin layers in transformers 5's layout (``SwinLayer``: ``attention.{q,k,v,o}_proj`` and the relative
    position bias table ``attention.relative_position_bias``, ``mlp.fc1/fc2``, ``layernorm_before/after``): see
    :class:`_Windowed`."""

    kind = "hf_swin"
    PLAIN = frozenset({"dropout", "relative_position_bias"})

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        _keep_bias_table_columns(self.module.attention.relative_position_bias, keep)


class _HFSwinLegacyBlock(_Windowed, _HFViTLegacyBlock):
    """Swin layers in the older layout (``attention.self.{query,key,value}`` with the bias table
    ``relative_position_bias_table`` beside them, ``attention.output.dense``; the residual added by the layer:
    ``x + output(intermediate(layernorm_after(x)))``): Donut's and MaskFormer's Swin, CLAP's audio encoder, Swin
    in transformers 4. See :class:`_Windowed`."""

    kind = "hf_swin"
    SA = "attention.self"
    RESID_FFN = ("layernorm_after", 0)

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        _keep_bias_table_columns(_get(self.module, self.SA), keep)


class _HFSwinv2Block(_Windowed, _HFViTLegacyBlock):
    """Swin V2 layers (``Swinv2Layer``: Swin's older part names, cosine attention with a continuous position bias)
    in "res-post-norm" order: ``x + layernorm_before(attn(x))``, then ``x + layernorm_after(output(intermediate(x)))``.
    The sublayers read the residual stream itself and a LayerNorm normalises their outputs before the sums, which
    the refit accounts for (see ``_centres`` in :mod:`nn_adapters.transformer`). A head's part of the position bias
    is its output of the bias network (``continuous_position_bias_mlp``'s last layer: one row per head) and its
    ``logit_scale``. See :class:`_Windowed`."""

    kind = "hf_swinv2"
    SA = "attention.self"
    RESID_FFN = ("intermediate", 0)  # the FFN's input is the residual stream
    PLAIN = frozenset({"dropout", "continuous_position_bias_mlp"})

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        return hasattr(sa, "continuous_position_bias_mlp") and super().matches(module)

    def output_norm(self, stage: str) -> nn.Module | None:
        return self.module.layernorm_after if stage == "ffn" else self.module.layernorm_before

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        sa = _get(self.module, self.SA)
        last = sa.continuous_position_bias_mlp[-1]
        keep = _index_to(keep, last.weight)
        sa.continuous_position_bias_mlp[-1] = _linear_like(last, last.weight[keep],
                                                           None if last.bias is None else last.bias[keep])
        sa.logit_scale = _sliced_parameter(sa.logit_scale, keep)


class _HFBeitLegacyBlock(_BeitLambdas, _HFViTLegacyBlock):
    """BEiT's older layout (``BeitLayer`` of transformers 4; ``Data2VecVisionLayer`` still in 5): ViT's older part
    names, pre-LN, but the FFN's output module adds no residual (``x + lambda_2 * output(intermediate(
    layernorm_after(x)))``), layer scales ``lambda_1`` / ``lambda_2`` (``None`` where ``layer_scale_init_value`` is
    0), and the relative position bias, where a layer has its own, inside the self-attention
    (``attention.attention.relative_position_bias``, a table of one column per head, which loses the removed heads'
    columns)."""

    kind = "hf_beit"
    RESID_FFN = ("layernorm_after", 0)  # x + lambda_2 * output(intermediate(layernorm_after(x)))
    PLAIN = frozenset({"dropout", "relative_position_bias"})

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        _keep_bias_table_columns(getattr(_get(self.module, self.SA), "relative_position_bias", None), keep)


def _keep_bias_table_columns(bias: nn.Module | None, keep: torch.Tensor) -> None:
    """Keep the columns ``keep`` of a relative position bias's table of one column per head (BEiT), if there is one."""
    table = getattr(bias, "relative_position_bias_table", None)
    if isinstance(table, nn.Parameter):
        bias.relative_position_bias_table = _sliced_parameter(table, keep, dim=1)


class _HFDinov2Block(_HFPreLNProjBlock):
    """DINOv2 (``Dinov2Layer`` with the plain MLP: ``attention.{q,k,v,o}_proj``, ``norm1/norm2``, pre-LN), whose
    layer scales ``layer_scale1/2`` multiply the attention and FFN outputs channel by channel before the residual
    sums: the refit aims at ``(target - residual) / lambda`` and weighs output channel ``i`` by ``lambda_i^2``."""

    kind = "hf_dinov2"
    SA, OUT = "attention", "attention.o_proj"
    RESID_FFN = ("norm2", 0)  # x + layer_scale2(mlp(norm2(x)))
    SCALE_HEADS, SCALE_FFN = "layer_scale1", "layer_scale2"


class _HFDinov2LegacyBlock(_HFDinov2Block):
    """DINOv2 in the layout of transformers < 5.18: ``attention.attention.{query,key,value}`` and
    ``attention.output.dense`` (the rest as in :class:`_HFDinov2Block`)."""

    SA, QKV, OUT = "attention.attention", ("query", "key", "value"), "attention.output.dense"
    HEAD_SIZE, ALL_HEADS = "attention_head_size", "all_head_size"


class _HFDinov3Block(_HFDinov2Block):
    """DINOv3 ViT layers (``DINOv3ViTLayer``): DINOv2's order, norms and layer scales with rotary position
    embeddings, the attention's head count in ``num_heads`` and the FFN ``mlp.up_proj`` / ``mlp.down_proj``."""

    kind = "hf_dinov3"
    UP, DOWN = "mlp.up_proj", "mlp.down_proj"
    N_HEADS = "num_heads"


class _HFDinov3GatedBlock(_HFDinov3Block):
    """DINOv3 ViT layers with the gated FFN (``use_gated_mlp``, the 7B model): ``mlp.down_proj(act(mlp.gate_proj(x))
    * mlp.up_proj(x))``."""

    GATE = "mlp.gate_proj"


def _transformers_version() -> str:
    """The installed transformers release (only called for Hugging Face blocks, so transformers is there)."""
    from importlib.metadata import version

    return version("transformers")


class _HFCLIPBlock(_HFPreLNProjBlock):
    """CLIP / SigLIP-style encoder layers (``CLIPEncoderLayer``: ``self_attn.{q,k,v,out}_proj``, ``layer_norm1/2``),
    text and vision towers."""

    kind = "hf_clip"
    SA, OUT = "self_attn", "self_attn.out_proj"
    RESID_FFN = ("layer_norm2", 0)  # x + mlp(layer_norm2(x))
    N_HEADS = "num_heads"
    #: transformers releases from which these attentions reshape their output to their own width, by the module
    #: of the attention class; the older ones reshape it to the model width, which fewer heads cannot fill.
    WIDTH_FREE_SINCE = {"transformers.models.clip.modeling_clip": "5.0",
                        "transformers.models.siglip.modeling_siglip": "5.6",
                        "transformers.models.siglip2.modeling_siglip2": "5.6"}

    def prepare_heads(self) -> None:
        sa = _get(self.module, self.SA)
        since = self.WIDTH_FREE_SINCE.get(type(sa).__module__)
        if since is not None:
            from packaging.version import Version  # a dependency of transformers

            version = _transformers_version()
            if Version(version) < Version(since):
                raise ValueError(f"block {self.name!r}: {type(sa).__name__} in transformers {version} reshapes the "
                                 f"attention output to the model width, so heads cannot be removed from it. Upgrade "
                                 f"transformers to >= {since} to prune heads, or prune target='ffn' on this model.")
        super().prepare_heads()


class _HFModernBertBlock(_HFBlock):
    """ModernBERT encoder layers (``ModernBertEncoderLayer``): query, key and value fused in ``attn.Wqkv`` (three
    blocks of the attention's width: every query head's rows, then the key heads', then the value heads'), the
    output projection ``attn.Wo``, the gated FFN ``mlp.Wi`` / ``mlp.Wo`` (``input, gate = Wi(x).chunk(2, -1)``,
    ``Wo(act(input) * gate)``: unit ``i`` is rows ``i`` and ``intermediate_size + i`` of ``Wi``), LayerNorms
    ``attn_norm`` (an identity in the first layer) and ``mlp_norm``, pre-LN. Local (sliding-window) and global
    layers alternate, each called with its mask and rotary tables: every layer is replayed with its own
    arguments."""

    kind = "hf_modernbert"
    SA, QKV, OUT = "attn", ("Wqkv",), "attn.Wo"
    UP, DOWN = "mlp.Wi", "mlp.Wo"
    FFN_PARTS = 2
    NORM_HEADS = NORM_FFN = "-"  # pre-LN: no LayerNorm after the sums
    RESID_FFN = ("mlp_norm", 0)  # x + mlp(mlp_norm(x))
    HEAD_SIZE, N_HEADS, ALL_HEADS = "head_dim", "", None
    PLAIN = frozenset({"out_drop", "rotary_emb"})

    @property
    def num_heads(self) -> int:
        return int(self.out_proj.in_features) // self.head_dim

    def qkv_weights(self) -> list[torch.Tensor]:
        return _three_blocks(weight_of(_get(self.module, self.SA).Wqkv))

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        width = self.num_heads * self.head_dim
        rows = _head_rows(_index_to(keep, self.out_proj.weight), self.head_dim)
        self._cut_attention((_three_block_rows(rows, width),), rows, out_weight, out_bias)


class _HFModernBertDecoderBlock(_HFModernBertBlock):
    """ModernBERT decoder layers (``ModernBertDecoderLayer``: the Ettin decoders): the encoder's layout and FFN,
    causal, with the query, key and value projections apart (``attn.{q,k,v}_proj``, one row block per head) and
    a key/value cache; sliding-window and global layers, each replayed with its own arguments."""

    kind = "hf_modernbert_decoder"
    QKV = ("q_proj", "k_proj", "v_proj")
    N_HEADS, ALL_HEADS = "num_heads", "all_head_size"

    def qkv_weights(self) -> list[torch.Tensor]:
        return _HFBlock.qkv_weights(self)

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        _HFBlock.shrink_heads(self, keep, out_weight, out_bias)


class _HFDistilBertBlock(_HFBlock):
    """DistilBERT (``TransformerBlock``): ``attention.{q,k,v,out}_lin``, ``ffn.lin1/lin2``, post-LN."""

    kind = "hf_distilbert"
    SA, QKV, OUT = "attention", ("q_lin", "k_lin", "v_lin"), "attention.out_lin"
    UP, DOWN = "ffn.lin1", "ffn.lin2"
    NORM_HEADS, NORM_FFN = "sa_layer_norm", "output_layer_norm"
    RESID_FFN = ("ffn", 0)  # output_layer_norm(ffn(x) + x)
    # transformers 4 reshapes heads with dim // n_heads, so dim is the inner width there
    N_HEADS, ALL_HEADS, CHUNK = "n_heads", "dim", "ffn"


@functools.cache
def _called_before(cls: type[nn.Module], first: str, second: str) -> bool | None:
    """Whether the source of the first ``forward`` along the class's MRO that contains both calls ``first`` and
    ``second`` has ``first`` before ``second`` (a subclass may delegate to its parent's); ``None`` where none does.
    Used to read a layer's norm order; the functional layout check on the first batch then confirms the reading (a
    wrong one is refused, never used)."""
    for klass in cls.__mro__:
        if "forward" not in vars(klass):
            continue
        try:
            src = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):
            return None
        a, b = src.find(first), src.find(second)
        if a >= 0 and b >= 0:
            return a < b
    return None


class _NormOrderRead(_HFBlock):
    """A layer that exists pre-LN and post-LN under the same part names, told apart by the order of two calls in its
    forward (:attr:`ORDER`: the first before the second means pre-LN; read by :func:`_called_before` and confirmed on
    the first batch). Post-LN, the norms after the sums weigh the refit and the FFN's residual is its own input (that
    of :attr:`FFN_INPUT`); pre-LN, the FFN's residual is the input of ``final_layer_norm``."""

    ORDER: tuple[str, str]
    FFN_INPUT: str

    @classmethod
    def _norm_order_known(cls, module: nn.Module) -> bool:
        return _called_before(type(module), *cls.ORDER) is not None

    def _pre_ln(self) -> bool:
        return bool(_called_before(type(self.module), *self.ORDER))

    def post_norm(self, stage: str) -> nn.LayerNorm | None:
        return None if self._pre_ln() else super().post_norm(stage)

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | None:
        if stage != "ffn":
            return None
        return (self.module.final_layer_norm if self._pre_ln() else _get(self.module, self.FFN_INPUT), 0)


class _HFBartBlock(_NormOrderRead):
    """BART-family layers, encoder or decoder: ``self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``,
    ``fc1 / fc2``, ``final_layer_norm``. Post-LN in BART, Marian and PLBart; pre-LN in mBART, Pegasus, M2M100 /
    NLLB, Blenderbot, Whisper, XGLM and BioGPT (read from the order of the calls in the layer's forward, then
    checked on the first batch like every layout). A decoder layer's cross-attention (``encoder_attn``) is left
    as it is: the self-attention's heads and the FFN are pruned. The attention reshapes to ``embed_dim`` in
    transformers 4, which therefore follows the heads."""

    kind = "hf_bart"
    SA, QKV, OUT = "self_attn", ("q_proj", "k_proj", "v_proj"), "self_attn.out_proj"
    UP, DOWN = "fc1", "fc2"
    NORM_HEADS, NORM_FFN = "self_attn_layer_norm", "final_layer_norm"
    RESID_FFN = ("final_layer_norm", 0)  # pre-LN: x + fc2(act(fc1(final_layer_norm(x))))
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", "embed_dim"

    ORDER, FFN_INPUT = ("self.final_layer_norm(", "self.fc1("), "fc1"  # post-LN: final_layer_norm(x + fc2(..fc1(x)))

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (all(isinstance(_get(module, p), nn.LayerNorm) for p in (cls.NORM_HEADS, cls.NORM_FFN))
                and cls._norm_order_known(module) and super().matches(module))

    @classmethod
    def _norm_order_known(cls, module: nn.Module) -> bool:
        return not hasattr(module, "do_layer_norm_before") and super()._norm_order_known(module)  # OPT's: its own

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        # a pre-LN decoder layer's cross-attention comes between: x + self_attn(.) enters encoder_attn_layer_norm
        cross = _get(self.module, "encoder_attn_layer_norm")
        return (cross, 0) if self._pre_ln() and isinstance(cross, nn.LayerNorm) else super().heads_sum_input()

    @property
    def cross(self) -> _HFBartCrossAttention | None:  # type: ignore[override]
        """A decoder layer's cross-attention (``encoder_attn``, ``encoder_attn_layer_norm``), or ``None``."""
        view = _HFBartCrossAttention(self.name, self.module)
        sa = _get(self.module, view.SA)
        if (sa is None or not all(isinstance(getattr(sa, n, None), nn.Linear) for n in view.QKV)
                or not isinstance(_get(self.module, view.OUT), nn.Linear)
                or not isinstance(_get(self.module, view.NORM_HEADS), nn.LayerNorm)):
            return None
        return view


class _HFWav2Vec2Block(_NormOrderRead):
    """wav2vec 2.0-family encoder layers (``Wav2Vec2EncoderLayer``: wav2vec 2.0, HuBERT, Data2Vec-audio,
    UniSpeech, SEW): ``attention.{q,k,v,out}_proj``, ``layer_norm``, the FFN ``feed_forward.intermediate_dense`` /
    ``output_dense``, ``final_layer_norm``. Post-LN in the base models (``layer_norm(x + attn(x))``, then
    ``final_layer_norm(h + ffn(h))``); pre-LN in the ``StableLayerNorm`` layers of the large ones (``x +
    attn(layer_norm(x))``, then ``h + ffn(final_layer_norm(h))``), read from the order of the calls in the layer's
    forward and checked on the first batch; MMS's language adapters (``adapter_layer``, added after the FFN's sum)
    are run as they are, the FFN's sum read at their input. The attention reshapes to ``embed_dim`` in transformers
    4, which therefore follows the heads."""

    kind = "hf_wav2vec2"
    SA, QKV, OUT = "attention", ("q_proj", "k_proj", "v_proj"), "attention.out_proj"
    UP, DOWN = "feed_forward.intermediate_dense", "feed_forward.output_dense"
    NORM_HEADS, NORM_FFN = "layer_norm", "final_layer_norm"
    RESID_FFN = ("feed_forward", 0)
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", "embed_dim"

    ORDER, FFN_INPUT = ("self.layer_norm(", "self.attention("), "feed_forward"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (all(isinstance(_get(module, p), nn.LayerNorm) for p in (cls.NORM_HEADS, cls.NORM_FFN))
                and cls._norm_order_known(module) and super().matches(module))

    def last_sum_probe(self) -> tuple[nn.Module, int] | None:
        # MMS's attention adapters (adapter_attn_dim): x + adapter_layer(x) after the FFN's sum
        adapter = getattr(self.module, "adapter_layer", None)
        return (adapter, 0) if isinstance(adapter, nn.Module) else None


class _HFBartCrossAttention(_HFBartBlock):
    """The cross-attention of a BART-family decoder layer (``encoder_attn.{q,k,v,out}_proj``: queries from the
    decoder, keys and values from the encoder's states), seen as a block whose heads are its heads: the layer's
    "cross" stage. Its output is added to the stream after the self-attention: the input of ``encoder_attn`` in a
    post-LN layer (the sum then enters ``encoder_attn_layer_norm``), the input of ``encoder_attn_layer_norm`` in a
    pre-LN one (the sum then enters ``final_layer_norm``, the FFN's norm)."""

    kind = "hf_bart (cross-attention)"
    SA, OUT = "encoder_attn", "encoder_attn.out_proj"
    NORM_HEADS = "encoder_attn_layer_norm"

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | None:
        if stage == "ffn":
            return super().residual_input(stage)
        return (_get(self.module, self.NORM_HEADS) if self._pre_ln() else _get(self.module, self.SA), 0)

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        return (self.module.final_layer_norm, 0) if self._pre_ln() else None

    @property
    def cross(self) -> None:  # type: ignore[override]
        return None


class _HFOPTBlock(_HFBartBlock):
    """OPT decoder layers (``OPTDecoderLayer``): the parts of the BART family; pre-LN where
    ``do_layer_norm_before`` (OPT-125m, 1.3b and larger), post-LN otherwise (OPT-350m). The layer runs its FFN on
    the tokens flattened to (batch * tokens, features)."""

    kind = "hf_opt"

    @staticmethod
    def _norm_order_known(module: nn.Module) -> bool:
        return isinstance(getattr(module, "do_layer_norm_before", None), bool)

    def _pre_ln(self) -> bool:
        return bool(self.module.do_layer_norm_before)


class _HFGPT2Block(_HFBlock):
    """GPT-2 (``GPT2Block``): the fused query/key/value projection ``attn.c_attn``, ``attn.c_proj``,
    ``mlp.c_fc / c_proj``, all ``Conv1D`` (weights stored ``(in, out)``), ``ln_1 / ln_2``, pre-LN. Head ``h`` is
    ``head_dim`` columns in each of c_attn's three ``split_size``-wide output blocks (query, key, value); removing
    heads updates the attention's ``num_heads`` and ``split_size``, as ``GPT2Attention.prune_heads`` does. Blocks
    with cross-attention (``add_cross_attention``) are pruned in their self-attention and FFN."""

    kind = "hf_gpt2"
    SA, QKV, OUT = "attn", ("c_attn",), "attn.c_proj"
    UP, DOWN = "mlp.c_fc", "mlp.c_proj"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN: no LayerNorm after the sums
    RESID_FFN = ("ln_2", 0)  # x + mlp(ln_2(x))
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", "split_size"
    PLAIN = frozenset({"attn_dropout", "resid_dropout"})

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        sizes = [getattr(sa, a, None) for a in ("num_heads", "head_dim", "split_size")]
        return (
            sa is not None
            and all(is_conv1d(_get(module, p)) for p in ("attn.c_attn", cls.OUT, cls.UP, cls.DOWN))
            and all(isinstance(_get(module, p), nn.LayerNorm) for p in ("ln_1", "ln_2"))
            and all(isinstance(v, int) for v in sizes) and not getattr(sa, "is_cross_attention", False)
            and sa.c_attn.nf == 3 * sizes[2] and sizes[2] == sizes[0] * sizes[1]
        )

    def qkv_weights(self) -> list[torch.Tensor]:
        return _three_blocks(weight_of(_get(self.module, self.SA).c_attn))

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        rows = _head_rows(_index_to(keep, self.out_proj.weight), self.head_dim)
        self._cut_attention((_three_block_rows(rows, int(sa.split_size)),), rows, out_weight, out_bias)
        sa.num_heads = int(keep.numel())
        sa.split_size = int(keep.numel()) * self.head_dim


class _QueryHeadUnits:
    """Attention units of a block with key/value groups (grouped-query attention): a whole group (a key/value head
    and the query heads that read it) by default, or, with :data:`QUERY_HEADS` (``head_unit="query"``), the query
    heads, as many kept in every group (:attr:`head_parts`: the groups), every key and value head kept. A pruning
    spec records the query heads kept per group (``num_key_value_groups``, spec version 2) where they changed.

    Mixed in before :class:`_HFBlock` by blocks that define ``kv_groups`` (query heads per key/value head),
    ``num_heads``, ``value_dim``, :data:`QUERY_HEADS_OK` and a ``shrink_heads`` that keeps query heads when
    :attr:`query_heads` is set (Llama-style layers, Falcon's new decoder architecture)."""

    #: Whether the block can lose query heads within its key/value groups (``head_unit="query"``); ``False`` where a
    #: subclass lays out or shares its heads otherwise.
    QUERY_HEADS_OK = True

    def _mark_head_units(self) -> None:
        """Record on the attention the key/value groups as first prepared (which a spec compares with, see
        :meth:`spec`) and whether its units are query heads (``head_unit="query"``: :data:`QUERY_HEADS`)."""
        sa = _get(self.module, self.SA)
        if not hasattr(sa, _GROUPS_MARK):
            setattr(sa, _GROUPS_MARK, self.kv_groups)
        # unmarked where it cannot: prune_transformer then refuses the groups with head_unit="query"
        setattr(sa, _QUERY_MARK, QUERY_HEADS.get() and self.kv_groups > 1 and self.QUERY_HEADS_OK)

    @property
    def query_heads(self) -> bool:
        return bool(getattr(_get(self.module, self.SA), _QUERY_MARK, False))

    @property
    def head_parts(self) -> int:
        return self.num_heads // self.kv_groups if self.query_heads else 1

    @property
    def head_units(self) -> int:
        return self.num_heads if self.query_heads else self.num_heads // self.kv_groups

    @property
    def head_unit_width(self) -> int:
        return self.value_dim if self.query_heads else self.kv_groups * self.value_dim

    def spec(self) -> dict[str, Any]:
        out = {**super().spec(), "num_key_value_heads": self.num_heads // self.kv_groups}
        if self.kv_groups != self._trained_kv_groups():  # query heads removed within the groups
            out["num_key_value_groups"] = self.kv_groups
        return out

    def _trained_kv_groups(self) -> int:
        """Query heads per key/value head when the attention was first prepared for head pruning (recorded on it
        then, :data:`_GROUPS_MARK`), or the current count if it never was."""
        return int(getattr(_get(self.module, self.SA), _GROUPS_MARK, self.kv_groups))

    def plan_sizes(self, spec: Mapping[str, Any]) -> None:
        self._spec_groups = spec.get("num_key_value_groups")

    def extra_sizes_problem(self, spec: Mapping[str, Any]) -> str | None:
        problem = super().extra_sizes_problem(spec)
        g = spec.get("num_key_value_groups")
        if problem is not None or g is None:
            return problem
        n_kv, kv = self.num_heads // self.kv_groups, spec.get("num_key_value_heads")
        if (not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= self.kv_groups
                or not isinstance(kv, int) or not 1 <= kv <= n_kv or spec["num_heads"] != g * kv):
            return (f"the spec has num_key_value_groups={g!r}, num_key_value_heads={kv!r} and num_heads="
                    f"{spec['num_heads']!r}, the model's block {n_kv} key/value heads of {self.kv_groups} query heads")
        return None

    def set_sizes(self, intermediate_size: int, num_heads: int) -> None:
        """As :meth:`_HFBlock.set_sizes`; a spec whose query heads were removed within the key/value groups
        (``num_key_value_groups``, read by :meth:`plan_sizes`) keeps the first ones of every group, then the
        first ``num_heads / num_key_value_groups`` groups."""
        groups = getattr(self, "_spec_groups", None)
        if groups is None or groups == self.kv_groups:
            super().set_sizes(intermediate_size, num_heads)
            return
        token = QUERY_HEADS.set(True)
        try:
            self.prepare_heads()
        finally:
            QUERY_HEADS.reset(token)
        sa = _get(self.module, self.SA)
        n_kv = self.num_heads // self.kv_groups
        self.shrink_heads((torch.arange(n_kv).view(-1, 1) * self.kv_groups + torch.arange(groups)).reshape(-1))
        setattr(sa, _QUERY_MARK, False)  # then whole groups, where some went too
        super().set_sizes(intermediate_size, num_heads)


class _HFLlamaBlock(_QueryHeadUnits, _HFBlock):
    """Llama-style decoder layers (``LlamaDecoderLayer`` and look-alikes with the same parts: Mistral, Qwen2,
    Qwen3...): ``self_attn.{q,k,v,o}_proj``, the gated FFN ``mlp.{gate,up,down}_proj`` (``down(act(gate(x)) *
    up(x))``: unit ``i`` is row ``i`` of gate and up), RMSNorms ``input_layernorm`` / ``post_attention_layernorm``,
    pre-norm. The rotary position embeddings and the causal mask reach the layer through its keyword arguments.

    Attention units are key/value groups: one key/value head and the ``num_key_value_groups`` query heads that
    read it (one head each without grouped-query attention), i.e. ``num_key_value_groups * head_dim``
    consecutive columns of ``o_proj``'s input. Removing whole groups keeps ``num_key_value_groups`` and
    ``head_dim``, the only head bookkeeping these attentions hold; the shared ``config`` is not changed (a
    pruned checkpoint records each layer's sizes in the pruning spec). With :data:`QUERY_HEADS`
    (``head_unit="query"``) the units are the query heads, ``head_dim`` columns each, and every group keeps as
    many (:attr:`head_parts`: the groups), its key and value heads kept: ``num_key_value_groups`` becomes the
    query heads kept per group.
    """

    kind = "hf_llama"
    SA, QKV, OUT = "self_attn", ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj"
    GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
    NORM_HEADS = NORM_FFN = "-"  # pre-norm: no norm after the sums
    RESID_FFN = ("post_attention_layernorm", 0)  # x + mlp(post_attention_layernorm(x))
    HEAD_SIZE, N_HEADS, ALL_HEADS = "head_dim", "", None
    #: q_norm / k_norm (Qwen3) normalise each head over head_dim, shared by all heads; rotary_emb (transformers 4)
    #: holds no weights.
    PLAIN = frozenset({"dropout", "rotary_emb", "q_norm", "k_norm", "v_norm", "g_proj", "gate_proj"})
    #: Output gates of the attention (``attn * f(gate(x))`` before ``o_proj``), whose rows :meth:`shrink_heads` cuts
    #: with their heads; the unit-removal check on the first batch confirms the layout.
    OUTPUT_GATES = ("g_proj", "gate_proj")
    #: Attributes of the attentions of transformers before the attention refactor of 4.48, which reshape their
    #: output to the model width and size their views by these per-module head counts.
    LEGACY = ("num_heads", "hidden_size")

    def prepare_ffn(self) -> None:
        mlp = _get(self.module, self.DOWN.rpartition(".")[0])  # the FFN module (mlp, feed_forward...)
        tp = getattr(getattr(mlp, "config", None), "pretraining_tp", 1)
        # transformers 4 slices the FFN by pretraining_tp in its forward; transformers 5 ignores the field
        code = getattr(type(mlp).forward, "__code__", None)
        if tp is not None and int(tp) > 1 and code is not None and "pretraining_tp" in code.co_names:
            raise ValueError(f"block {self.name!r}: its FFN is computed in pretraining_tp={tp} slices of the "
                             "intermediate size, which removing neurons would misalign; set "
                             "config.pretraining_tp = 1 (the same function, unsliced) before pruning.")

    def prepare_heads(self) -> None:
        sa = _get(self.module, self.SA)
        # the attributes its forward reads (EXAONE 4 keeps hidden_size and head counts it never reads)
        read = getattr(getattr(type(sa).forward, "__code__", None), "co_names", self.LEGACY)
        legacy = [a for a in self.LEGACY if hasattr(sa, a) and a in read]
        if legacy:
            from packaging.version import Version  # a dependency of transformers

            version = _transformers_version()
            hint = (" Llama, Mistral and Qwen2 attentions lose heads with transformers >= 4.48: upgrade transformers "
                    "to prune their heads." if Version(version) < Version("4.48") else "")
            raise ValueError(f"block {self.name!r}: {type(sa).__name__} in transformers {version} keeps per-module "
                             f"head counts ({', '.join(legacy)}) and reshapes the attention output to the model "
                             f"width, so heads cannot be removed from it. Prune target='ffn' on this model.{hint}")
        for part in ("q_norm", "k_norm", "v_norm"):  # OLMo 2 / 3, OLMoE, FlexOlmo, MiniMax-M2: one over every head
            weight = getattr(getattr(sa, part, None), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.shape[-1] != self.head_dim:
                raise ValueError(f"block {self.name!r}: {type(sa).__name__}'s q_norm / k_norm normalise the "
                                 f"queries and keys over all heads together ({weight.shape[-1]} features, not one "
                                 f"head's {self.head_dim}), so removing a head would change every other head's "
                                 "attention. Prune target='ffn' on this model.")
        super().prepare_heads()
        self._mark_head_units()

    def qkv_weights(self) -> list[torch.Tensor]:
        if self.query_heads:  # a unit is a query head: its query rows (the key and value heads stay)
            return [getattr(_get(self.module, self.SA), self.QKV[0]).weight]
        return super().qkv_weights()

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (``num_key_value_groups``; 1 without grouped-query attention)."""
        return int(getattr(_get(self.module, self.SA), "num_key_value_groups", 1))

    @property
    def value_dim(self) -> int:
        """Width of one head's values and output-projection columns: the attention's ``v_head_dim`` where it has
        one (MiMo-V2-Flash: values narrower than queries and keys), else ``head_dim``."""
        v = getattr(_get(self.module, self.SA), "v_head_dim", None)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else self.head_dim

    @property
    def num_heads(self) -> int:
        return int(self.out_proj.in_features) // self.value_dim

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        """Keep the key/value groups ``keep``: their key and value heads, their query heads (and their sink
        logits, GPT-OSS's and MiMo-V2-Flash's ``sinks``; their rows of an output gate, ``g_proj`` or ``gate_proj``
        inside the attention, one row per query head (LFM3, Laguna) or one per output channel (Laguna); their
        rows of per-head query and key norm weights, Cohere's qk-norm) and the output projection's columns of those
        query heads. With :attr:`query_heads`, ``keep`` are query heads, as many in every group, and every key
        and value head stays."""
        keep = _index_to(keep, self.out_proj.weight)
        sa = _get(self.module, self.SA)
        n_heads, groups = self.num_heads, self.kv_groups  # before the cut
        n_kv = n_heads // groups
        if self.query_heads:
            per = int(keep.numel()) // n_kv
            heads, kv = _balanced_query_heads(self, keep, n_kv), torch.arange(n_kv, device=keep.device)
        else:
            per, heads, kv = groups, _head_rows(keep, groups), keep  # the query heads of the kept groups
        rows = self._qkv_rows(_head_rows(heads, self.head_dim), _head_rows(kv, self.head_dim),
                              _head_rows(kv, self.value_dim))
        self._cut_attention(rows, _head_rows(heads, self.value_dim), out_weight, out_bias)
        for name in self.OUTPUT_GATES:  # attn * f(gate(x)) before o_proj: per query head, or per output channel
            gate = getattr(sa, name, None)
            if isinstance(gate, nn.Linear) and gate.out_features in (n_heads, n_heads * self.value_dim):
                r = heads if gate.out_features == n_heads else _head_rows(heads, self.value_dim)
                setattr(sa, name, _linear_like(gate, weight_of(gate)[r], None if gate.bias is None else gate.bias[r]))
        # parameters with a row per head: sinks (one per query head), query and key norms with weights of their own
        # per head (Cohere's qk-norm: (heads, head_dim)); a norm shared by the heads ((head_dim,)) stays as it is
        norms = [(norm, name, kept) for part, kept in (("q_norm", heads), ("k_norm", kv))
                 if (norm := getattr(sa, part, None)) is not None
                 for name, p in norm.named_parameters(recurse=False) if p.dim() == 2]
        per_head = [(sa, "sinks", heads), *norms]
        for owner, name, kept in per_head:
            p = getattr(owner, name, None)
            if isinstance(p, nn.Parameter):
                setattr(owner, name, _sliced_parameter(p, kept))
        for attr, count in (("num_attention_heads", int(heads.numel())), ("num_key_value_heads", int(kv.numel())),
                            ("num_key_value_groups", per)):
            if isinstance(getattr(sa, attr, None), int):  # kept in step where the attention holds them (EXAONE 4)
                setattr(sa, attr, count)

    def _qkv_rows(self, q_rows: torch.Tensor, k_rows: torch.Tensor,
                  v_rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows to keep of each projection in :attr:`QKV`, given the kept query, key and value rows (``head_dim``
        rows a query or key head, :attr:`value_dim` a value head). A gated query (Qwen3-Next, Qwen3.5: ``q_proj``
        yields each head's ``head_dim`` queries then its ``head_dim`` output gates, ``attn * sigmoid(gate)`` before
        ``o_proj``) keeps both halves of each kept head's rows."""
        query = getattr(_get(self.module, self.SA), self.QKV[0])
        if query.out_features == 2 * self.num_heads * self.head_dim:
            head, col = q_rows // self.head_dim, q_rows % self.head_dim
            start = 2 * self.head_dim * head + col
            q_rows = torch.sort(torch.cat([start, start + self.head_dim])).values
        return q_rows, k_rows, v_rows

    def set_ffn(self, producers: list[nn.Linear], down: nn.Linear) -> None:
        super().set_ffn(producers, down)
        mlp = _get(self.module, self.DOWN.rpartition(".")[0])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(down.in_features)

    def output_scale(self, stage: str) -> torch.Tensor | None:
        """Granite's ``residual_multiplier`` (MiniCPM3's ``residual_scale``), a number the layer multiplies both
        sublayers' outputs by before their residual sums (``x + attn(...) * m``; 0.22 in Granite 3), as a
        per-channel factor; ``None`` without one."""
        m = getattr(self.module, "residual_multiplier", None)
        if m is None:
            m = getattr(self.module, "residual_scale", None)
        if not isinstance(m, (int, float)) or isinstance(m, bool) or m == 1:
            return None
        lin = _get(self.module, self.DOWN) if stage == "ffn" and self.DOWN else None
        lin = lin if isinstance(lin, nn.Linear) else self.out_proj  # a layer without attention has a down projection
        return torch.full((lin.out_features,), float(m), dtype=lin.weight.dtype)


def _balanced_query_heads(blk: _QueryHeadUnits, keep: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``keep``, query heads of ``blk`` kept within its ``n_kv`` key/value groups; a ``ValueError`` unless every
    group keeps as many."""
    groups, per = blk.kv_groups, int(keep.numel()) // n_kv
    if bool((torch.bincount(keep // groups, minlength=n_kv) != per).any()) or per * n_kv != keep.numel():
        raise ValueError(f"block {blk.name!r}: its query heads are kept as many in each of its {n_kv} key/value "
                         f"groups; got heads {keep.tolist()}")
    return keep


class _HFAimv2Block(_HFLlamaBlock):
    """AIMv2 encoder layers (``Aimv2EncoderLayer``, vision and text towers): Llama's pre-norm layout under other
    names, ``attention.{q,k,v,out}_proj``, the gated FFN ``ffn.{gate,up,down}_proj``, RMS norms ``rms_norm1`` /
    ``rms_norm2``; the attention's head count in ``num_heads``."""

    kind = "hf_aimv2"
    SA, OUT = "attention", "attention.out_proj"
    GATE, UP, DOWN = "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"
    RESID_FFN = ("rms_norm2", 0)  # x + ffn(rms_norm2(x))
    N_HEADS = "num_heads"


class _HFPixtralBlock(_HFLlamaBlock):
    """Pixtral's vision encoder layers (``PixtralAttentionLayer``, Mistral's vision towers): Llama's pre-norm layout
    under other names, ``attention.{q,k,v,o}_proj``, the gated FFN ``feed_forward.{gate,up,down}_proj``, RMS norms
    ``attention_norm`` / ``ffn_norm``; the images of a batch packed in one sequence under a block-diagonal mask."""

    QUERY_HEADS_OK = False  # heads laid out or shared otherwise (see shrink_heads)

    kind = "hf_pixtral"
    SA, OUT = "attention", "attention.o_proj"
    GATE, UP, DOWN = "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"
    RESID_FFN = ("ffn_norm", 0)  # x + feed_forward(ffn_norm(x))
    N_HEADS = "num_heads"
    #: Its attention sizes its views by ``num_heads`` (kept in step with the heads) and reshapes its output to its
    #: own width, so the legacy refusal of :class:`_HFLlamaBlock` does not apply.
    LEGACY = ()

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        _get(self.module, self.SA).num_heads = int(keep.numel())


class _HFEsmcBlock(_HFLlamaBlock):
    """ESM C protein encoder layers (``EsmcLayer``): Llama's parts with LayerNorms, each sublayer's output divided
    by ``scaling_factor`` (``sqrt(num_hidden_layers / 36)``, ESM3's residue scaling) before its residual sum, read as
    the output scale ``1 / scaling_factor``. Its ``q_norm`` / ``k_norm`` normalise all heads together, so heads are
    refused (by :meth:`_HFLlamaBlock.prepare_heads`)."""

    kind = "hf_esmc"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        d = getattr(module, "scaling_factor", None)
        return (type(module).__name__ == "EsmcLayer" and isinstance(d, (int, float)) and not isinstance(d, bool)
                and d > 0 and super().matches(module))

    def output_scale(self, stage: str) -> torch.Tensor | None:
        lin = self.down if stage == "ffn" else self.out_proj
        return torch.full((lin.out_features,), 1.0 / float(self.module.scaling_factor), dtype=lin.weight.dtype)


class _HFLlamaPlainBlock(_HFLlamaBlock):
    """Llama's attention and norms with a plain FFN, ``mlp.down_proj(act(mlp.up_proj(x)))`` (Nemotron and the
    Minitron models, Arcee, Jais 2; ReLU^2 activations): unit ``i`` is row ``i`` of ``up_proj``."""

    kind = "hf_llama_plain"
    GATE, UP = None, "mlp.up_proj"


class _HFApertusBlock(_HFLlamaPlainBlock):
    """Apertus decoder layers: the plain FFN of :class:`_HFLlamaPlainBlock` with the norms named
    ``attention_layernorm`` / ``feedforward_layernorm``."""

    RESID_FFN = ("feedforward_layernorm", 0)  # x + mlp(feedforward_layernorm(x))


class _HFNanoChatBlock(_HFLlamaPlainBlock):
    """NanoChat decoder layers: the plain FFN of :class:`_HFLlamaPlainBlock` as ``mlp.fc1`` / ``mlp.fc2``."""

    UP, DOWN = "mlp.fc1", "mlp.fc2"


class _PostLNSums:
    """Encoder layers with Llama's attention parts but BERT's order: a LayerNorm after each residual sum (post-LN),
    ``h = post_attention_layernorm(x + attn(x))``, ``post_mlp_layernorm(h + mlp(h))``, no norm before the
    sublayers; mixed into the Llama adapter of the layer's FFN. The refit weighs tokens and channels through those
    LayerNorms, as BERT's."""

    NORM_HEADS, NORM_FFN = "post_attention_layernorm", "post_mlp_layernorm"
    RESID_FFN = ("mlp", 0)  # h + mlp(h): the FFN's residual is its own input

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (isinstance(getattr(module, cls.NORM_FFN, None), nn.LayerNorm)
                and isinstance(getattr(module, cls.NORM_HEADS, None), nn.LayerNorm)
                and getattr(module, "input_layernorm", None) is None
                and super().matches(module))  # type: ignore[misc]


class _HFGteBlock(_PostLNSums, _HFLlamaBlock):
    """GTE v1.5 / mGTE (``GteLayer``) and Nomic Embed (``NomicBertLayer``): post-LN encoder layers
    (:class:`_PostLNSums`) with Llama's attention and gated FFN ``mlp.{gate,up,down}_proj``."""

    kind = "hf_gte"


class _HFJinaV3Block(_PostLNSums, _HFNanoChatBlock):
    """Jina Embeddings v3 (``JinaEmbeddingsV3Layer``): post-LN encoder layers (:class:`_PostLNSums`) with Llama's
    attention and a plain FFN ``mlp.fc1`` / ``mlp.fc2``."""

    kind = "hf_jina_v3"


class _FusedGateUp(_HFLlamaBlock):
    """The Llama parts with the gated FFN's gate and up projections fused in one ``mlp.gate_up_proj`` whose output
    is split in two halves, ``gate, up = gate_up_proj(x).chunk(2, dim=-1)`` (Phi-3, GLM, GLM-4): unit ``i`` is
    its rows ``i`` and ``intermediate_size + i`` (checked on the first batch like every gated FFN)."""

    GATE, UP = None, "mlp.gate_up_proj"
    FFN_PARTS = 2


class OwnHeadCounts:
    """One attention's view of the config every layer shares, with head counts of its own: ``num_attention_heads``
    and ``num_key_value_heads`` are this layer's, every other attribute is read from the shared config when asked
    for (so a later change of it, such as ``model.set_attn_implementation("eager")``, reaches this layer too).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> shared = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, _attn_implementation="sdpa")
    >>> view = OwnHeadCounts(shared, 16, 4)
    >>> view.num_attention_heads, shared.num_attention_heads
    (16, 32)
    >>> shared._attn_implementation = "eager"
    >>> view._attn_implementation
    'eager'
    """

    def __init__(self, shared: Any, num_attention_heads: int, num_key_value_heads: int) -> None:
        self.shared = shared.shared if isinstance(shared, OwnHeadCounts) else shared
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads

    def __getattr__(self, name: str) -> Any:  # called only for what this view does not hold itself
        shared = self.__dict__.get("shared")
        if shared is None:  # while copy or pickle rebuild the view
            raise AttributeError(name)
        return getattr(shared, name)

    def __repr__(self) -> str:
        return (f"OwnHeadCounts(num_attention_heads={self.num_attention_heads}, "
                f"num_key_value_heads={self.num_key_value_heads}, shared={type(self.shared).__name__})")


class _HFPhi3Block(_FusedGateUp):
    """Phi-3, Phi-3.5 and Phi-4-mini decoder layers (``Phi3DecoderLayer``): the Llama layout with query, key and
    value fused in ``self_attn.qkv_proj`` (every query head's rows, then the key heads', then the value heads') and
    gate and up fused in ``mlp.gate_up_proj``. The attention finds its key rows at ``config.num_attention_heads *
    head_dim``, read from the config every layer shares: an attention that loses heads gets an
    :class:`OwnHeadCounts` view of it with its head counts, so the other layers and the model's config are
    unchanged and every other setting still comes from the shared config. Query heads go alone with
    ``head_unit="query"`` as in the other Llama-style layers (their rows of the first block of ``qkv_proj``)."""

    kind = "hf_phi3"
    QKV = ("qkv_proj",)

    def _widths(self) -> tuple[int, int]:
        """Rows of ``qkv_proj`` holding the queries, and the keys (as many hold the values)."""
        return self.num_heads * self.head_dim, self.num_heads // self.kv_groups * self.head_dim

    def qkv_weights(self) -> list[torch.Tensor]:
        weight = weight_of(_get(self.module, self.SA).qkv_proj)
        q, kv = self._widths()
        if self.query_heads:  # a unit is a query head: its query rows (the key and value heads stay)
            return [weight[:q]]
        return [weight[:q], weight[q:q + kv], weight[q + kv:]]

    def _qkv_rows(self, q_rows: torch.Tensor, k_rows: torch.Tensor,
                  v_rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, kv = self._widths()
        return (torch.cat([q_rows, q + k_rows, q + kv + v_rows]),)

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        super().shrink_heads(keep, out_weight, out_bias)
        sa = _get(self.module, self.SA)
        if hasattr(getattr(sa, "config", None), "num_attention_heads"):  # the counts after the cut
            sa.config = OwnHeadCounts(sa.config, self.num_heads, self.num_heads // self.kv_groups)


class _HFGlmBlock(_FusedGateUp):
    """GLM decoder layers (``GlmDecoderLayer``: GLM-4-9B and its chat models): the Llama layout with gate and up
    fused in ``mlp.gate_up_proj``; rotary embeddings on part of each head, which removing whole heads keeps."""

    kind = "hf_glm"


class _SharedExpert(_Block):
    """The shared expert of a mixture of experts (Qwen2-MoE ``shared_expert``, GLM-4-MoE, ERNIE 4.5, EXAONE and
    dots.llm1 ``shared_experts``, HunYuan ``shared_mlp``): a dense gated FFN ``down(act(gate(x)) * up(x))`` of
    ``nn.Linear`` layers (or a plain one, ``down(act(up(x)))``: NemotronH) that every token passes through, its
    output added to the routed experts' sum, times ``sigmoid(shared_expert_gate(x))`` in Qwen2-MoE
    (:meth:`_HFMoEBlock.shared_factor`). ``module`` is the shared MLP itself; only the FFN interface of
    :class:`_Block` is used (its ``shrink_ffn``, magnitude and Wanda-style scores)."""

    kind = "hf_moe_shared"

    @staticmethod
    def looks_like(module: nn.Module) -> bool:
        """Whether ``module`` is the gated (or plain) FFN this adapter models."""
        gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        return (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and callable(_activation(module))
                and up.out_features == down.in_features
                and (gate is None or (isinstance(gate, nn.Linear) and gate.out_features == up.out_features
                                      and gate.in_features == up.in_features)))

    @property
    def up(self) -> nn.Linear:
        return self.module.up_proj

    @property
    def down(self) -> nn.Linear:
        return self.module.down_proj

    @property
    def producers(self) -> list[nn.Linear]:
        gate = getattr(self.module, "gate_proj", None)
        return [self.module.up_proj] if gate is None else [gate, self.module.up_proj]

    def set_ffn(self, producers: list[nn.Linear], down: nn.Linear) -> None:
        if len(producers) == 2:
            self.module.gate_proj = producers[0]
        self.module.up_proj = producers[-1]
        self.module.down_proj = down
        if isinstance(getattr(self.module, "intermediate_size", None), int):
            self.module.intermediate_size = down.in_features

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate activations ``act(gate(x)) * up(x)`` (``act(up(x))``: a plain FFN) on the token rows
        ``x``."""
        m = self.module
        gate = getattr(m, "gate_proj", None)
        return _activation(m)(m.up_proj(x)) if gate is None else _activation(m)(gate(x)) * m.up_proj(x)


class _FusedSharedExpert(_SharedExpert):
    """A shared expert whose gate and up projections are fused in one ``input_linear`` (its output's halves: the
    gate's, then the up's; ``output_linear`` the down projection): GraniteMoE-Shared's and Granite 4.0 H's
    ``shared_mlp``, which sits beside the mixture module (:attr:`_HFMoEBlock.SHARED_OUTSIDE`). Unit ``i`` is rows
    ``i`` and ``I + i`` of ``input_linear``."""

    kind = "hf_moe_shared_fused"
    FFN_PARTS = 2

    @staticmethod
    def looks_like(module: nn.Module) -> bool:
        """Whether ``module`` is the fused gated FFN this adapter models."""
        inp, out = getattr(module, "input_linear", None), getattr(module, "output_linear", None)
        return (isinstance(inp, nn.Linear) and isinstance(out, nn.Linear) and callable(_activation(module))
                and inp.out_features == 2 * out.in_features)

    @property
    def up(self) -> nn.Linear:
        return self.module.input_linear

    @property
    def down(self) -> nn.Linear:
        return self.module.output_linear

    @property
    def producers(self) -> list[nn.Linear]:
        return [self.module.input_linear]

    def set_ffn(self, producers: list[nn.Linear], down: nn.Linear) -> None:
        self.module.input_linear, self.module.output_linear = producers[0], down

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate activations ``act(gate) * up`` of the two halves of ``input_linear(x)``."""
        gate, up = self.module.input_linear(x).chunk(2, dim=-1)
        return _activation(self.module)(gate) * up


def _shared_expert(name: str, module: nn.Module) -> _SharedExpert:
    """The shared-expert adapter of ``module``: fused (``input_linear``) or not."""
    return (_FusedSharedExpert if _FusedSharedExpert.looks_like(module) else _SharedExpert)(name, module)


def _activation(mlp: nn.Module) -> Any:
    """A gated MLP's activation (``act_fn``, Llama 4's ``activation_fn``, Granite's ``activation``), or ``None``."""
    return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None) or getattr(mlp, "activation", None)


class _HFMoEBlock(_HFLlamaBlock):
    """Llama-style decoder layers whose FFN is a mixture of experts stored as 3D tensors, the layout of
    transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE, MiniMax, GLM-4-MoE, ERNIE 4.5 MoE, HunYuan MoE,
    EXAONE MoE, ...): ``mlp.experts.gate_up_proj`` ``(E, 2 I, H)`` and ``mlp.experts.down_proj`` ``(E, H, I)``,
    called as ``experts(hidden_states, top_k_index, top_k_weights)`` on the flattened tokens, each token's output
    ``sum_j w_j down_e_j(act(gate_e_j(x)) * up_e_j(x))`` over its routed experts ``e_j`` (the router ``mlp.gate``
    or ``mlp.router`` reads the block's normalised input, which FFN pruning does not change).

    An FFN unit is one intermediate neuron of every expert at once in the tensors' shapes (all experts of a layer
    keep the same number), but each expert chooses its own neurons: :meth:`shrink_ffn` takes one row of kept
    indices per expert. A shared expert (``shared_expert``, ``shared_experts``, ``shared_mlp``: a dense gated FFN
    every token passes through, :class:`_SharedExpert`) is pruned by the same fraction, as one more regression.
    That the experts compute the sum above, and that the FFN's output is that sum plus the shared expert's output
    (times :meth:`shared_factor`), is checked on the first calibration batch (a ``ValueError`` otherwise).
    """

    kind = "hf_moe"
    EXPERTS = "mlp.experts"
    UP = DOWN = GATE = None  # no Linear: the producers and the consumer are slices of the experts' 3D tensors
    FFN_PARTS = 2
    moe = True
    MLP = "mlp"
    #: Where a shared expert lives, and the per-token gate of its output (Qwen2-MoE), if any.
    SHARED: tuple[str, ...] = ("mlp.shared_expert", "mlp.shared_experts", "mlp.shared_mlp")
    SHARED_GATE: str | None = "mlp.shared_expert_gate"
    #: Whether the shared expert sits beside the mixture module rather than inside it (GraniteMoE-Shared's and
    #: Granite 4.0 H's ``shared_mlp``: the layer adds the two outputs): the mixture module's output is then the
    #: experts' alone, and the shared expert must read the experts' input (both checked on the first batch).
    SHARED_OUTSIDE = False
    #: Whether that shared expert beside the mixture reads an input of its own (Gemma 4's MLP, after another norm
    #: than the experts'): its regression rows are then its own captured input.
    SHARED_OWN_INPUT = False
    #: The experts' parameters (3D tensors) the adapter models: their producer, then their consumer.
    EXPERT_PARAMS: tuple[str, ...] = ("gate_up_proj", "down_proj")

    @staticmethod
    def _expert_layout(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        """Whether the experts' tensors have this layout's shapes: ``(E, 2 I, H)`` and ``(E, H, I)``."""
        return (gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
                and gate_up.shape[2] == down.shape[1])

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        ex = _get(module, cls.EXPERTS)
        gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
        return (
            sa is not None
            and all(isinstance(getattr(sa, n, None), nn.Linear) for n in cls.QKV)
            and isinstance(_get(module, cls.OUT), nn.Linear)
            and isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == dn.dim() == 3
            and cls._expert_layout(gu, dn)
            and isinstance(_get(module, cls.RESID_FFN[0]), nn.Module)
        )

    @property
    def experts(self) -> nn.Module:
        return _get(self.module, self.EXPERTS)

    @property
    def n_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def ffn_units(self) -> int:
        return int(self.experts.down_proj.shape[2])

    @property
    def gated(self) -> bool:
        """Whether an expert's unit is a gate row and an up row (not for plain experts, ``FFN_PARTS`` 1)."""
        return self.FFN_PARTS > 1

    @property
    def up(self) -> nn.Linear:
        raise TypeError(f"block {self.name!r}: a mixture of experts has no single up projection")

    @property
    def down(self) -> nn.Linear:
        raise TypeError(f"block {self.name!r}: a mixture of experts has no single down projection")

    @property
    def shared(self) -> _SharedExpert | None:
        """The shared expert, or ``None`` (a mixture without one)."""
        for path in self.SHARED:
            m = _get(self.module, path)
            if isinstance(m, nn.Module):
                return _shared_expert(f"{self.name}.{path}", m)
        return None

    def shared_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-token factor ``(rows, 1)`` of the shared expert's output (Qwen2-MoE's
        ``sigmoid(shared_expert_gate(x))``), or ``None`` where it is added as it is."""
        gate = None if self.SHARED_GATE is None else _get(self.module, self.SHARED_GATE)
        return None if gate is None else torch.sigmoid(gate(x))

    def mixture_factor(self) -> float:
        """The number the mixture module multiplies the experts' sum plus the shared expert's output by (1; Cohere's
        average of the two, 0.5). A constant factor on a whole regression changes no refit: only the first-batch
        check of the mixture's output reads it."""
        return 1.0

    def prepare_ffn(self) -> None:
        ex = self.experts
        extra = sorted(n for n, _ in ex.named_parameters(recurse=True) if n not in self.EXPERT_PARAMS)
        if extra or not callable(getattr(ex, "act_fn", None)):
            what = (f"parameters besides {' and '.join(self.EXPERT_PARAMS)} ({', '.join(extra)})" if extra
                    else "no act_fn")
            raise ValueError(f"block {self.name!r}: its experts ({type(ex).__name__}) have {what}, which the "
                             "expert adapter does not model; this model's FFN cannot be pruned by the transformer "
                             "adapter (prune target='heads').")
        shared = self.shared
        gate = None if self.SHARED_GATE is None else _get(self.module, self.SHARED_GATE)
        if shared is not None and not type(shared).looks_like(shared.module):
            raise ValueError(f"block {self.name!r}: its shared expert {shared.name!r} "
                             f"({type(shared.module).__name__}) is not a gated FFN of gate_proj, up_proj and "
                             "down_proj Linear layers (or input_linear and output_linear) with an act_fn, the layout "
                             "the expert adapter models; this model's FFN cannot be pruned by the transformer "
                             "adapter (prune target='heads').")
        if gate is not None and not (isinstance(gate, nn.Linear) and gate.out_features == 1 and shared is not None):
            raise ValueError(f"block {self.name!r}: its shared_expert_gate ({type(gate).__name__}) is not a Linear "
                             "layer with one output gating a shared expert, the layout the expert adapter models; "
                             "this model's FFN cannot be pruned by the transformer adapter (prune target='heads').")

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s intermediate activations ``act(gate(x)) * up(x)`` on the token rows ``x``."""
        ex = self.experts
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
        return ex.act_fn(gate) * up

    def expert_out(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s output on its intermediate activations ``h``."""
        return F.linear(h, self.experts.down_proj[e])

    #: Whether each expert's down projection has a bias (refitted with it).
    experts_bias = False
    #: Whether the routing score multiplies the expert's input (Llama 4: ``expert(s * x)``, the outputs summed as
    #: they are) rather than its output (``s * expert(x)``, the others).
    scores_on_input = False

    def expert_down_weight(self, e: int) -> torch.Tensor:
        """Expert ``e``'s down projection as ``(out, in)`` = ``(H, I)`` (a view)."""
        return self.experts.down_proj[e]

    def expert_down_bias(self, e: int) -> torch.Tensor | None:
        """Expert ``e``'s down-projection bias ``(H,)``, or ``None``."""
        return None

    def expert_magnitude(self, e: int) -> torch.Tensor:
        """Per neuron of expert ``e``: the sum of the squared L2 norms of its gate row, up row and down column
        (float64)."""
        ex, units = self.experts, self.ffn_units
        gu = ex.gate_up_proj[e].detach().double().pow(2).sum(1).view(2, units).sum(0)
        return gu + self.expert_down_weight(e).detach().double().pow(2).sum(0)

    def zero_ffn_unit(self, unit: int) -> None:
        self.experts.down_proj[:, :, unit] = 0.0
        shared = self.shared
        if shared is not None:
            shared.zero_ffn_unit(unit)

    def drop_first_ffn_unit(self) -> None:
        self.shrink_ffn(torch.arange(1, self.ffn_units))
        shared = self.shared
        if shared is not None:
            shared.shrink_ffn(torch.arange(1, shared.ffn_units))

    @property
    def unit_multiple(self) -> int:
        """Kept neurons per expert are rounded up to a multiple of this: transformers 5 runs experts with
        ``grouped_mm`` by default (``config._experts_implementation``), whose kernel needs 16-byte aligned strides,
        i.e. an intermediate size that is a multiple of ``16 / element size`` (4 in float32, 8 in bfloat16); 1 with
        the ``"eager"`` loop."""
        impl = getattr(getattr(self.experts, "config", None), "_experts_implementation", "eager")
        return 1 if impl in (None, "eager") else max(1, 16 // self.experts.down_proj.element_size())

    def for_probe(self) -> None:
        """On a deep copy used by a unit-removal check: run the experts with the ``"eager"`` loop, which takes any
        intermediate size (the copy holds its own config)."""
        cfg = getattr(self.experts, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        """Keep, in expert ``e``, its neurons ``keep[e]`` (``keep``: ``(E, k)`` sorted rows, or one row ``(k,)`` for
        every expert); new down weights ``(E, H, k)`` if given (the experts have no bias)."""
        ex = self.experts
        producer = self.EXPERT_PARAMS[0]  # gate_up_proj: the gate rows, then the up rows; a plain up_proj
        gu, dn = getattr(ex, producer), ex.down_proj
        keep = _index_to(keep, dn)
        if keep.dim() == 1:
            keep = keep.expand(dn.shape[0], -1)
        units = dn.shape[2]
        rows = torch.cat([keep + part * units for part in range(self.FFN_PARTS)], dim=1)
        new_gu = torch.stack([gu[e, rows[e]] for e in range(gu.shape[0])])
        new_dn = (torch.stack([dn[e][:, keep[e]] for e in range(dn.shape[0])]) if down_weight is None
                  else down_weight.to(device=dn.device, dtype=dn.dtype))
        setattr(ex, producer, nn.Parameter(new_gu.detach().clone(), requires_grad=gu.requires_grad))
        ex.down_proj = nn.Parameter(new_dn.detach().clone(), requires_grad=dn.requires_grad)
        if hasattr(ex, "intermediate_dim"):
            ex.intermediate_dim = int(keep.shape[1])

    #: Where the router may live (the first module found): the mixture module's ``gate`` or ``router``.
    ROUTERS: tuple[str, ...] | None = None

    @property
    def router(self) -> nn.Module | None:
        """The mixture's router (:attr:`ROUTERS`), or ``None``."""
        for path in self.ROUTERS or (f"{self.MLP}.gate", f"{self.MLP}.router"):
            m = _get(self.module, path)
            if isinstance(m, nn.Module):
                return m
        return None

    @property
    def routing(self) -> nn.Module | None:
        """What whole-expert pruning calls, with the router's arguments, for the ``(weights, experts)`` the experts
        receive: the router itself (DBRX: with its mixture's routing function after it)."""
        return self.router

    def drop_experts(self, keep: torch.Tensor) -> None:
        """Keep only the experts ``keep`` (sorted indices): their rows of the experts' tensors and of the router's
        (its weight, bias and per-expert buffers such as a score-correction bias), the mixture module's own
        per-expert tensors (AFMoE's expert bias), and every count of experts in those modules (``num_experts``)."""
        n, mlp, router = self.n_experts, _get(self.module, self.MLP), self.router
        keep = keep.to(torch.long)
        drop_experts(self.experts, n, keep)
        if router is not None:
            drop_experts(router, n, keep)
        if isinstance(mlp, nn.Module):
            drop_experts(mlp, n, keep, recurse=False)

    def spec(self) -> dict[str, Any]:
        shared = self.shared
        extra = {"shared_intermediate_size": shared.ffn_units} if self._shared_prunable(shared) else {}
        return {**super().spec(), "experts": self.n_experts, **extra}

    @staticmethod
    def _shared_prunable(shared: _SharedExpert | None) -> bool:
        return shared is not None and type(shared).looks_like(shared.module)

    def extra_sizes_problem(self, spec: Mapping[str, Any]) -> str | None:
        problem = super().extra_sizes_problem(spec)
        n, shared = spec.get("shared_intermediate_size"), self.shared
        if problem is not None:
            return problem
        n_exp = spec.get("experts")
        if n_exp is not None and not (isinstance(n_exp, int) and not isinstance(n_exp, bool)
                                      and 1 <= n_exp <= self.n_experts):
            return f"the spec has experts={n_exp!r}, the model's block {self.n_experts}"
        if n is None or (self._shared_prunable(shared) and isinstance(n, int) and not isinstance(n, bool)
                         and 1 <= n <= shared.ffn_units):
            return None
        have = ("no shared expert of the gated layout" if not self._shared_prunable(shared)
                else f"a shared expert of {shared.ffn_units} neurons")
        return f"the spec has shared_intermediate_size={n!r}, the model's block {have}"

    def set_extra_sizes(self, spec: Mapping[str, Any]) -> None:
        super().set_extra_sizes(spec)
        n, shared = spec.get("shared_intermediate_size"), self.shared
        if n is not None and shared is not None:
            shared.shrink_ffn(torch.arange(int(n)))
        n_exp = spec.get("experts")
        if n_exp is not None and n_exp < self.n_experts:  # whole experts removed: the weights are loaded after
            self.drop_experts(torch.arange(int(n_exp)))


@functools.cache
def _gate_up_concatenated(cls: type[nn.Module]) -> bool:
    """See :attr:`_HFGptOssBlock.concatenated` (read once per experts class)."""
    try:
        src = inspect.getsource(cls._apply_gate)
    except (OSError, TypeError, AttributeError):
        return False
    return ".chunk(2" in src and "::2]" not in src


class _HFGptOssBlock(_HFMoEBlock):
    """GPT-OSS decoder layers: Llama-style attention with a learned sink logit per query head (``self_attn.sinks``,
    kept with its head) and a mixture of experts of another layout than :class:`_HFMoEBlock`'s: transposed
    ``gate_up_proj`` ``(E, H, 2I)`` whose gate and up columns interleave (neuron ``i``: columns ``2i`` and
    ``2i + 1``), ``down_proj`` ``(E, I, H)``, biases on both (``gate_up_proj_bias``, ``down_proj_bias``, the latter
    refitted), and the clamped SwiGLU of the experts' own ``_apply_gate``; the mixture module ``mlp`` returns
    ``(output, router_scores)``."""

    kind = "hf_gpt_oss"
    experts_bias = True
    SHARED = ()
    SHARED_GATE = None

    @property
    def concatenated(self) -> bool:
        """Whether ``gate_up_proj``'s columns are every gate column, then every up column (the experts' gate split
        by ``chunk(2, dim=-1)``, as the OpenAI privacy filter's), rather than interleaved (GPT-OSS's ``[..., ::2]``);
        read from the source of the experts' ``_apply_gate`` and confirmed by the first-batch unit check."""
        return _gate_up_concatenated(type(self.experts))

    def mixture_factor(self) -> float:
        """The OpenAI privacy filter's mixture multiplies the experts' sum by its ``num_experts`` (the experts per
        token); GPT-OSS's by nothing."""
        n = getattr(_get(self.module, self.MLP), "num_experts", None) if self.concatenated else None
        return float(n) if isinstance(n, int) and not isinstance(n, bool) else 1.0

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        ex = _get(module, cls.EXPERTS)
        parts = [getattr(ex, n, None) for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")]
        if sa is None or not all(isinstance(p, nn.Parameter) for p in parts):
            return False
        gu, gub, dn, dnb = parts
        return (
            all(isinstance(getattr(sa, n, None), nn.Linear) for n in cls.QKV)
            and isinstance(_get(module, cls.OUT), nn.Linear)
            and callable(getattr(ex, "_apply_gate", None))
            and gu.dim() == dn.dim() == 3 and gub.dim() == dnb.dim() == 2
            and gu.shape[0] == gub.shape[0] == dn.shape[0] == dnb.shape[0]
            and gu.shape[1] == dn.shape[2] == dnb.shape[1] and gu.shape[2] == gub.shape[1] == 2 * dn.shape[1]
            and isinstance(_get(module, cls.RESID_FFN[0]), nn.Module)
        )

    @property
    def ffn_units(self) -> int:
        return int(self.experts.down_proj.shape[1])

    def prepare_ffn(self) -> None:
        ex = self.experts
        known = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        extra = sorted(n for n, _ in ex.named_parameters(recurse=True) if n not in known)
        if extra:
            raise ValueError(f"block {self.name!r}: its experts ({type(ex).__name__}) have parameters besides "
                             f"{', '.join(known)} ({', '.join(extra)}), which the expert adapter does not model; "
                             "this model's FFN cannot be pruned by the transformer adapter (prune target='heads').")

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        return ex._apply_gate(x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e])

    def expert_out(self, e: int, h: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        return h @ ex.down_proj[e] + ex.down_proj_bias[e]

    def expert_down_weight(self, e: int) -> torch.Tensor:
        return self.experts.down_proj[e].t()

    def expert_down_bias(self, e: int) -> torch.Tensor | None:
        return self.experts.down_proj_bias[e]

    def expert_magnitude(self, e: int) -> torch.Tensor:
        ex = self.experts
        gu = ex.gate_up_proj[e].detach().double().pow(2).sum(0)
        gu = gu.view(2, self.ffn_units).sum(0) if self.concatenated else gu.view(self.ffn_units, 2).sum(1)
        return gu + ex.down_proj[e].detach().double().pow(2).sum(1)

    def zero_ffn_unit(self, unit: int) -> None:
        self.experts.down_proj[:, unit, :] = 0.0

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        """Keep, in expert ``e``, its neurons ``keep[e]`` (``(E, k)``, or ``(k,)`` for every expert); new down
        weights ``(E, H, k)`` (``(out, in)``, stored transposed) and biases ``(E, H)`` if given."""
        ex = self.experts
        dn = ex.down_proj
        keep = _index_to(keep, dn)
        if keep.dim() == 1:
            keep = keep.expand(dn.shape[0], -1)
        if self.concatenated:  # the gate columns, then the up columns
            cols = torch.cat([keep, keep + self.ffn_units], dim=-1)
        else:  # gate and up columns, interleaved
            cols = torch.stack([2 * keep, 2 * keep + 1], dim=-1).flatten(1)
        new = {
            "gate_up_proj": torch.stack([ex.gate_up_proj[e][:, cols[e]] for e in range(dn.shape[0])]),
            "gate_up_proj_bias": torch.stack([ex.gate_up_proj_bias[e][cols[e]] for e in range(dn.shape[0])]),
            "down_proj": (torch.stack([dn[e][keep[e]] for e in range(dn.shape[0])]) if down_weight is None
                          else down_weight.transpose(1, 2).to(device=dn.device, dtype=dn.dtype)),
            "down_proj_bias": (ex.down_proj_bias if down_bias is None
                               else down_bias.to(device=dn.device, dtype=dn.dtype)),
        }
        for name, value in new.items():
            old = getattr(ex, name)
            setattr(ex, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        if hasattr(ex, "intermediate_size"):
            ex.intermediate_size = int(keep.shape[1])



class _HFLlama4Block(_HFLlamaBlock):
    """Llama 4's dense decoder layers (``Llama4TextDecoderLayer`` with ``Llama4TextMLP``): the Llama attention with
    a parameter-free L2 norm of each head's queries and keys (``qk_norm``, in the RoPE layers), the gated FFN
    ``feed_forward.{gate,up,down}_proj``."""

    kind = "hf_llama4"
    GATE, UP, DOWN = "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"
    PLAIN = _HFLlamaBlock.PLAIN | {"qk_norm"}


class _TransposedExperts:
    """Experts stored transposed, ``gate_up_proj`` ``(E, H, 2I)`` (the gate columns, then the up columns) and
    ``down_proj`` ``(E, I, H)``, without biases (Llama 4, Aria): the layout methods of :class:`_HFMoEBlock`."""

    @staticmethod
    def _expert_layout(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        """Transposed: ``(E, H, 2 I)`` and ``(E, I, H)``."""
        return (gate_up.shape[0] == down.shape[0] and gate_up.shape[2] == 2 * down.shape[1]
                and gate_up.shape[1] == down.shape[2])

    @property
    def ffn_units(self) -> int:
        return int(self.experts.down_proj.shape[1])  # type: ignore[attr-defined]

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ex, units = self.experts, self.ffn_units  # type: ignore[attr-defined]
        gate_up = x @ ex.gate_up_proj[e]
        return ex.act_fn(gate_up[..., :units]) * gate_up[..., units:]

    def expert_out(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return h @ self.experts.down_proj[e]  # type: ignore[attr-defined]

    def expert_down_weight(self, e: int) -> torch.Tensor:
        return self.experts.down_proj[e].t()  # type: ignore[attr-defined]

    def expert_magnitude(self, e: int) -> torch.Tensor:
        ex, units = self.experts, self.ffn_units  # type: ignore[attr-defined]
        gu = ex.gate_up_proj[e].detach().double().pow(2).sum(0).view(2, units).sum(0)
        return gu + ex.down_proj[e].detach().double().pow(2).sum(1)

    def zero_ffn_unit(self, unit: int) -> None:
        self.experts.down_proj[:, unit, :] = 0.0  # type: ignore[attr-defined]
        shared = self.shared  # type: ignore[attr-defined]
        if shared is not None:
            shared.zero_ffn_unit(unit)

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        """Keep, in expert ``e``, its neurons ``keep[e]`` (``(E, k)``, or ``(k,)`` for every expert); new down
        weights ``(E, H, k)`` (``(out, in)``, stored transposed) if given."""
        ex = self.experts  # type: ignore[attr-defined]
        gu, dn = ex.gate_up_proj, ex.down_proj
        keep = _index_to(keep, dn)
        if keep.dim() == 1:
            keep = keep.expand(dn.shape[0], -1)
        cols = torch.cat([keep, keep + dn.shape[1]], dim=1)  # the gate columns, then the up columns
        new_gu = torch.stack([gu[e][:, cols[e]] for e in range(dn.shape[0])])
        new_dn = (torch.stack([dn[e][keep[e]] for e in range(dn.shape[0])]) if down_weight is None
                  else down_weight.transpose(1, 2).to(device=dn.device, dtype=dn.dtype))
        ex.gate_up_proj = nn.Parameter(new_gu.detach().clone(), requires_grad=gu.requires_grad)
        ex.down_proj = nn.Parameter(new_dn.detach().clone(), requires_grad=dn.requires_grad)
        for attr in ("expert_dim", "intermediate_size", "intermediate_dim"):
            if isinstance(getattr(ex, attr, None), int):
                setattr(ex, attr, int(keep.shape[1]))


class _HFLlama4MoEBlock(_TransposedExperts, _HFMoEBlock):
    """Llama 4's mixture-of-experts layers (``Llama4TextMoe``): the attention of :class:`_HFLlama4Block`; a router
    whose sigmoid scores (zero outside each token's top experts) multiply the experts' input, every expert run on
    every token (``experts(x * s)``, batched matrix products), the outputs summed as they are; experts stored
    transposed (:class:`_TransposedExperts`); a shared expert ``shared_expert`` (Llama 4's MLP, its activation
    ``activation_fn``) added without a gate. An expert's regression rows are the tokens routed to it, on their
    scaled inputs, unweighted."""

    kind = "hf_llama4_moe"
    EXPERTS, MLP = "feed_forward.experts", "feed_forward"
    SHARED: tuple[str, ...] = ("feed_forward.shared_expert",)
    SHARED_GATE = None
    PLAIN = _HFLlamaBlock.PLAIN | {"qk_norm"}
    scores_on_input = True

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(_get(module, cls.MLP + ".router"), nn.Linear) and super().matches(module)

    @property
    def unit_multiple(self) -> int:
        return 1  # batched matrix products: any intermediate size runs


class _HFAriaMoEBlock(_TransposedExperts, _HFMoEBlock):
    """Aria's text decoder layers (``AriaTextDecoderLayer``): the Llama attention, the FFN a mixture of experts
    stored transposed (:class:`_TransposedExperts`, the routing weights on their outputs) and shared experts
    ``mlp.shared_experts`` (one gated FFN) added to their sum."""

    kind = "hf_aria_moe"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        ex = _get(module, cls.EXPERTS)  # GPT-OSS's experts have these shapes too, and biases
        return (isinstance(_get(module, cls.MLP + ".router"), nn.Module) and isinstance(ex, nn.Module)
                and {n for n, _ in ex.named_parameters()} == set(cls.EXPERT_PARAMS) and super().matches(module))


class _RoutedBy(nn.Module):
    """A router followed by the routing function of the module that calls it (``function(self, logits)``, reading
    the attributes ``attrs`` of that module, copied here), as one module returning what the function returns."""

    def __init__(self, router: nn.Module, function: Any, attrs: dict[str, Any]) -> None:
        super().__init__()
        self.router, self._function = router, function
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(self, self.router(*args, **kwargs))


class _HFDbrxBlock(_HFMoEBlock):
    """DBRX (``DbrxBlock``): ``norm_attn_norm`` holds the LayerNorms ``norm_1`` / ``norm_2`` and the attention
    ``attn`` (query, key and value fused in ``Wqkv``: every query head's rows, then the key heads', then the value
    heads' (grouped-query); clipped to ``clip_qkv``; ``out_proj``), then the mixture ``ffn``: a router and experts
    whose gate, up and down weights are stored flat, ``experts.mlp.w1`` / ``v1`` / ``w2`` of ``(E I, H)`` (expert
    ``e``: rows ``e I`` to ``(e + 1) I - 1``; its output ``(act(x w1_e^T) * (x v1_e^T)) w2_e``). The attention
    splits ``Wqkv``'s output by its ``hidden_size`` and ``num_key_value_heads``, which follow the heads."""

    kind = "hf_dbrx"
    SA, QKV, OUT = "norm_attn_norm.attn", ("Wqkv",), "norm_attn_norm.attn.out_proj"
    RESID_FFN = ("norm_attn_norm.norm_2", 0)  # x + ffn(norm_2(x)), the attention's sum entering norm_2
    EXPERTS, MLP = "ffn.experts", "ffn"
    SHARED: tuple[str, ...] = ()
    SHARED_GATE = None
    EXPERT_PARAMS = ("mlp.w1", "mlp.v1", "mlp.w2")
    ROUTERS = ("ffn.router",)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa, ex = _get(module, cls.SA), _get(module, cls.EXPERTS)
        flat = [getattr(_get(ex, "mlp"), n, None) for n in ("w1", "v1", "w2")]
        return (isinstance(getattr(sa, "Wqkv", None), nn.Linear) and isinstance(_get(module, cls.OUT), nn.Linear)
                and all(isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape == flat[0].shape for w in flat)
                and isinstance(getattr(ex, "ffn_hidden_size", None), int)
                and isinstance(getattr(ex, "num_experts", None), int)
                and flat[0].shape[0] == ex.ffn_hidden_size * ex.num_experts
                and isinstance(_get(module, cls.RESID_FFN[0]), nn.LayerNorm))

    # --- attention: Wqkv's three blocks of unequal widths -----------------------------------------------------
    def prepare_heads(self) -> None:
        _HFBlock.prepare_heads(self)  # hidden_size and num_key_value_heads are kept in step by shrink_heads
        self._mark_head_units()

    def _qkv_blocks(self) -> tuple[int, int]:
        sa = _get(self.module, self.SA)
        return int(sa.num_heads) * self.head_dim, int(sa.num_key_value_heads) * self.head_dim

    def qkv_weights(self) -> list[torch.Tensor]:
        q, kv = self._qkv_blocks()
        w = weight_of(_get(self.module, self.SA).Wqkv)
        if self.query_heads:  # a unit is a query head: its query rows (the key and value heads stay)
            return [w[:q]]
        return [w[:q], w[q:q + kv], w[q + kv:]]

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        """Keep the key/value groups ``keep``: their query heads' rows of the query block, their rows of the key
        and value blocks, and the output projection's columns of their query heads. With :attr:`query_heads`,
        ``keep`` are query heads, as many in every group: their query rows, every key and value row."""
        keep = _index_to(keep, self.out_proj.weight)
        sa = _get(self.module, self.SA)
        q, kv = self._qkv_blocks()
        n_kv = int(sa.num_key_value_heads)
        if self.query_heads:
            heads, kept_kv = _balanced_query_heads(self, keep, n_kv), torch.arange(n_kv, device=keep.device)
        else:
            heads, kept_kv = _head_rows(keep, self.kv_groups), keep
        q_rows = _head_rows(heads, self.head_dim)
        kv_rows = _head_rows(kept_kv, self.head_dim)
        self._cut_attention((torch.cat([q_rows, q + kv_rows, q + kv + kv_rows]),), q_rows, out_weight, out_bias)
        sa.num_heads, sa.num_key_value_heads = int(heads.numel()), int(kept_kv.numel())
        sa.num_key_value_groups = sa.num_heads // sa.num_key_value_heads
        sa.hidden_size = sa.num_heads * self.head_dim

    # --- experts: flat (E I, H) weights ------------------------------------------------------------------------
    @property
    def routing(self) -> nn.Module | None:
        """The router (``ffn.router``, which returns logits) followed by the mixture's own
        ``route_tokens_to_experts`` (softmax, top-k, weights normalised by their p-norm), as one module."""
        router, ffn = self.router, _get(self.module, self.MLP)
        if router is None or not callable(getattr(type(ffn), "route_tokens_to_experts", None)):
            return router
        return _RoutedBy(router, type(ffn).route_tokens_to_experts,
                         {n: getattr(ffn, n) for n in ("top_k", "moe_normalize_expert_weights") if hasattr(ffn, n)})

    def drop_experts(self, keep: torch.Tensor) -> None:
        """Keep only the experts ``keep`` (sorted): their rows ``e I ... (e + 1) I - 1`` of w1, v1 and w2 (cut
        here, before the counts change), then the router's rows and the counts of experts as in every mixture."""
        mlp, keep = self.experts.mlp, keep.to(torch.long)
        rows = {name: self._flat(name).index_select(0, _index_to(keep, getattr(mlp, name)))
                for name in ("w1", "v1", "w2")}
        super().drop_experts(keep)
        for name, value in rows.items():
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Parameter(value.reshape(-1, old.shape[-1]).detach().clone(),
                                            requires_grad=old.requires_grad))

    def _flat(self, name: str) -> torch.Tensor:
        """Expert weights ``name`` (``w1``, ``v1``, ``w2``) as ``(E, I, H)`` (a view)."""
        w = getattr(self.experts.mlp, name)
        return w.view(self.n_experts, -1, w.shape[-1])

    @property
    def n_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def ffn_units(self) -> int:
        return int(self.experts.ffn_hidden_size)

    def prepare_ffn(self) -> None:
        ex = self.experts
        extra = sorted(n for n, _ in ex.named_parameters(recurse=True) if n not in self.EXPERT_PARAMS)
        if extra or not callable(getattr(ex.mlp, "activation_fn", None)):
            raise ValueError(f"block {self.name!r}: its experts ({type(ex).__name__}) have "
                             + (f"parameters besides w1, v1 and w2 ({', '.join(extra)})" if extra else
                                "no activation_fn") + ", which the expert adapter does not model; this model's FFN "
                             "cannot be pruned by the transformer adapter (prune target='heads').")

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts.mlp.activation_fn(x @ self._flat("w1")[e].T) * (x @ self._flat("v1")[e].T)

    def expert_out(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return h @ self._flat("w2")[e]

    def expert_down_weight(self, e: int) -> torch.Tensor:
        return self._flat("w2")[e].t()

    def expert_magnitude(self, e: int) -> torch.Tensor:
        return sum(self._flat(n)[e].detach().double().pow(2).sum(1) for n in ("w1", "v1", "w2"))

    def zero_ffn_unit(self, unit: int) -> None:
        self._flat("w2")[:, unit, :] = 0.0

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        """Keep, in expert ``e``, its neurons ``keep[e]`` (``(E, k)``, or ``(k,)`` for every expert): their rows of
        w1, v1 and w2; new down weights ``(E, H, k)`` (``(out, in)``; stored as w2's rows) if given."""
        mlp, n = self.experts.mlp, self.n_experts
        keep = _index_to(keep, mlp.w2)
        if keep.dim() == 1:
            keep = keep.expand(n, -1)
        k = int(keep.shape[1])
        new = {name: torch.stack([self._flat(name)[e][keep[e]] for e in range(n)]) for name in ("w1", "v1", "w2")}
        if down_weight is not None:
            new["w2"] = down_weight.transpose(1, 2).to(device=mlp.w2.device, dtype=mlp.w2.dtype)
        for name, value in new.items():
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Parameter(value.reshape(n * k, -1).detach().clone(), requires_grad=old.requires_grad))
        self.experts.ffn_hidden_size = k
        if isinstance(getattr(mlp, "ffn_hidden_size", None), int):
            mlp.ffn_hidden_size = k


class _HFGraniteMoEBlock(_HFMoEBlock):
    """GraniteMoE decoder layers (and GraniteMoE-Shared's): the mixture of :class:`_HFMoEBlock` under the name
    ``block_sparse_moe``, whose output (like the attention's) is scaled by ``residual_multiplier`` before the
    residual sum. GraniteMoE-Shared's ``shared_mlp``, beside the mixture in the layer (gate and up fused in
    ``input_linear``: :class:`_FusedSharedExpert`), is pruned as a shared expert by the same fraction."""

    MLP = "block_sparse_moe"
    EXPERTS = "block_sparse_moe.experts"
    SHARED = ("shared_mlp",)
    SHARED_GATE = None
    SHARED_OUTSIDE = True


class _LatentAttention:
    """Multi-head latent attention (DeepSeek-V2 and V3, Kimi K2, Moonlight, MiniCPM3...), mixed into the Llama-style
    adapters for the FFN, dense (:class:`_HFMLABlock`) or a mixture of experts (:class:`_HFMLAMoEBlock`): queries
    from ``q_proj`` (or the low-rank ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``), keys and values from one
    compressed latent (``kv_a_proj_with_mqa`` -> ``kv_a_layernorm`` -> ``kv_b_proj``) with a rotary key part shared
    by every head, and ``o_proj`` reading ``num_heads * v_head_dim`` columns.

    A head is ``qk_head_dim`` rows of the query projection, ``qk_nope_head_dim + v_head_dim`` rows of
    ``kv_b_proj`` (its key and value decompressed from the latent) and ``v_head_dim`` columns of ``o_proj``; the
    latent projections and the shared rotary key stay (the cache, which holds the latent, keeps its size)."""

    SA, OUT = "self_attn", "self_attn.o_proj"
    QKV = ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    HEAD_SIZE, N_HEADS = "v_head_dim", "num_heads"
    #: ``g_proj``: a sigmoid output gate per head (Ring-linear's ``BailingHybridAttention``: ``attn * sigmoid(
    #: g_proj(x))`` before ``o_proj``, one row a head), whose rows go with their heads
    PLAIN = frozenset({"q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_layernorm", "dropout",
                       "rotary_emb", "g_proj"})
    LEGACY = ()  # the head count is kept in step; the functional check on the first batch confirms the layout

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        query = getattr(sa, "q_proj", None) or getattr(sa, "q_b_proj", None)
        return (isinstance(query, nn.Linear) and all(isinstance(getattr(sa, n, None), int)
                                                     for n in ("qk_nope_head_dim", "qk_rope_head_dim"))
                and super().matches(module))  # type: ignore[misc]

    def _query(self) -> str:
        return "q_proj" if isinstance(getattr(_get(self.module, self.SA), "q_proj", None), nn.Linear) else "q_b_proj"

    def _head_widths(self) -> tuple[tuple[str, int], ...]:
        """The projections whose rows come head by head, and each head's rows in them."""
        sa = _get(self.module, self.SA)
        return ((self._query(), sa.qk_nope_head_dim + sa.qk_rope_head_dim),
                ("kv_b_proj", sa.qk_nope_head_dim + sa.v_head_dim))

    @property
    def num_heads(self) -> int:
        return int(getattr(_get(self.module, self.SA), self.N_HEADS))

    @property
    def kv_groups(self) -> int:
        """One unit per head: every head has its own key and value (decompressed from the shared latent)."""
        return 1

    def qkv_weights(self) -> list[torch.Tensor]:
        sa = _get(self.module, self.SA)
        return [weight_of(getattr(sa, name)) for name, _ in self._head_widths()]

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        """Keep heads ``keep``: their rows of the query projection and of ``kv_b_proj``, their columns of
        ``o_proj`` (or ``out_weight``), their rows of a per-head output gate ``g_proj``."""
        sa = _get(self.module, self.SA)
        keep = _index_to(keep, self.out_proj.weight)
        gate = getattr(sa, "g_proj", None)
        if isinstance(gate, nn.Linear) and gate.out_features == self.num_heads:
            sa.g_proj = _linear_like(gate, weight_of(gate)[keep], None if gate.bias is None else gate.bias[keep])
        for name, width in self._head_widths():
            lin, rows = getattr(sa, name), _head_rows(keep, width)
            setattr(sa, name, _linear_like(lin, weight_of(lin)[rows], None if lin.bias is None else lin.bias[rows]))
        out = self.out_proj
        cols = _head_rows(keep, self.head_dim)
        w = weight_of(out)[:, cols] if out_weight is None else out_weight
        b = out.bias if out_weight is None else out_bias
        _set(self.module, self.OUT, _linear_like(out, w, b))
        sa.num_heads = int(keep.numel())


class _HFMLABlock(_LatentAttention, _HFLlamaBlock):
    """Decoder layers with multi-head latent attention (:class:`_LatentAttention`) and the Llama gated FFN
    ``mlp.{gate,up,down}_proj`` (DeepSeek-V2/V3's first dense layers, MiniCPM3)."""

    kind = "hf_mla"


class _HFMLAMoEBlock(_LatentAttention, _HFMoEBlock):
    """Decoder layers with multi-head latent attention (:class:`_LatentAttention`) and a mixture of experts with
    shared experts (:class:`_HFMoEBlock`: DeepSeek-V2 and V3, Kimi K2, Moonlight)."""

    kind = "hf_mla_moe"


class _HFLfm2Block(_HFLlamaBlock):
    """LFM2's attention layers (``Lfm2DecoderLayer`` with ``is_attention_layer``): the Llama-style grouped attention
    ``self_attn.{q,k,v,out}_proj`` with per-head ``q_layernorm`` / ``k_layernorm``, the gated FFN
    ``feed_forward.{w1, w3, w2}`` (``w2(silu(w1(x)) * w3(x))``: w1 the gate, w3 the up projection), RMS norms
    ``operator_norm`` / ``ffn_norm``, pre-norm."""

    kind = "hf_lfm2"
    OUT = "self_attn.out_proj"
    GATE, UP, DOWN = "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"
    RESID_FFN = ("ffn_norm", 0)  # x + feed_forward(ffn_norm(x))


class _HFLfm3Block(_HFLfm2Block):
    """LFM3's attention layers (``Lfm3DecoderLayer`` with ``is_attention_layer``): LFM2's layout with the attention
    output ``self_attn.o_proj``, per-head ``q_norm`` / ``k_norm``, a sigmoid output gate per query head
    (``self_attn.g_proj``: one row a head, ``attn * sigmoid(g_proj(x))`` before ``o_proj``; its rows go with the
    heads, :meth:`_HFLlamaBlock.shrink_heads`)
    and, with the config's ``use_sandwich_norm``, RMS norms on the attention and FFN outputs before the residual
    sums (``post_operator_norm`` / ``post_ffn_norm``, identities otherwise; :meth:`output_norm`)."""

    kind = "hf_lfm3"
    OUT = "self_attn.o_proj"
    OUT_NORMS = {"heads": "post_operator_norm", "ffn": "post_ffn_norm"}

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return super().matches(module) and all(isinstance(_get(module, p), nn.Module) for p in cls.OUT_NORMS.values())

    def output_norm(self, stage: str) -> nn.Module | None:
        norm = _get(self.module, self.OUT_NORMS[stage])
        return None if isinstance(norm, nn.Identity) else norm


class _NoHeads:
    """A hybrid stack's layer without attention (a convolution or a state-space layer in its place, ``OPERATOR``),
    mixed into the adapter of the stack's attention layers: its FFN is pruned, it has no heads (the "heads" stage
    skips it; its spec records ``num_heads`` 0)."""

    OPERATOR: str
    has_heads = False

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (cls._has_operator(module) and cls._has_ffn(module)
                and isinstance(_get(module, cls.RESID_FFN[0]), nn.Module))  # type: ignore[attr-defined]

    @classmethod
    def _has_operator(cls, module: nn.Module) -> bool:
        """Whether ``module`` holds the operator that stands in for the attention (``OPERATOR``, no attention)."""
        return (isinstance(getattr(module, cls.OPERATOR, None), nn.Module)
                and _get(module, cls.SA) is None)  # type: ignore[attr-defined]

    @classmethod
    def _has_ffn(cls, module: nn.Module) -> bool:
        """Whether ``module`` holds the FFN parts of the attention layers' adapter."""
        ffn = (cls.UP, cls.DOWN) + ((cls.GATE,) if cls.GATE else ())  # type: ignore[attr-defined]
        return all(isinstance(_get(module, p), nn.Linear) for p in ffn)

    @property
    def num_heads(self) -> int:
        return 0

    @property
    def head_dim(self) -> int:
        return 0

    @property
    def head_units(self) -> int:
        return 0

    def prepare_heads(self) -> None:
        """No attention: nothing to prepare."""

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        if keep.numel():
            raise ValueError(f"block {self.name!r} has no attention heads")  # type: ignore[attr-defined]

    def set_sizes(self, intermediate_size: int, num_heads: int) -> None:
        self.shrink_ffn(torch.arange(intermediate_size))  # type: ignore[attr-defined]


class _HFLfm2ConvBlock(_NoHeads, _HFLfm2Block):
    """LFM2's convolution layers (``Lfm2DecoderLayer`` with a gated short convolution ``conv`` in place of the
    attention): the FFN of :class:`_HFLfm2Block`, no heads."""

    kind = "hf_lfm2_conv"
    OPERATOR = "conv"


class _HFFNetBlock(_NoHeads, _HFBertBlock):
    """FNet (``FNetLayer``): a parameter-free Fourier transform over tokens and features in place of the attention
    (``fourier``, with its LayerNorm after the residual sum), then BERT's FFN ``intermediate.dense`` /
    ``output.dense`` and ``output.LayerNorm``, post-LN: the FFN is pruned, there are no heads. FNet takes no attention
    mask, so every position of a batch (padding included, which it mixes into the others) is a row."""

    kind = "hf_fnet"
    OPERATOR = "fourier"


class _HFLinearAttentionBlock(_NoHeads, _HFLlamaBlock):
    """Qwen3.5's and OLMo Hybrid's layers with a linear attention (``linear_attn``: a gated DeltaNet) in place of
    the softmax attention: the gated FFN of :class:`_HFLlamaBlock`, no heads. Qwen3.5's attention layers are
    Llama-style with a gated query (see :meth:`_HFLlamaBlock._qkv_rows`)."""

    kind = "hf_linear_attn"
    OPERATOR = "linear_attn"


class _HFRecurrentGemmaBlock(_HFLlamaBlock):
    """RecurrentGemma's (Griffin's) attention layers (``RecurrentGemmaDecoderLayer`` with a local attention as its
    ``temporal_block``: Llama projections, multi-query, ``o_proj`` with a bias), the gated FFN ``mlp_block.{gate,
    up,down}_proj`` (GELU, biases), RMS norms ``temporal_pre_norm`` / ``channel_pre_norm``, pre-norm."""

    kind = "hf_recurrent_gemma"
    SA, OUT = "temporal_block", "temporal_block.o_proj"
    GATE, UP, DOWN = "mlp_block.gate_proj", "mlp_block.up_proj", "mlp_block.down_proj"
    RESID_FFN = ("channel_pre_norm", 0)  # x + mlp_block(channel_pre_norm(x))


class _HFRecurrentGemmaRecurrentBlock(_NoHeads, _HFRecurrentGemmaBlock):
    """RecurrentGemma's recurrent layers (an RG-LRU ``temporal_block`` with ``linear_x``, ``linear_y``,
    ``conv_1d``, ``rg_lru``, ``linear_out``): the FFN of :class:`_HFRecurrentGemmaBlock`, no heads."""

    kind = "hf_recurrent_gemma_rec"
    OPERATOR = "temporal_block"

    @classmethod
    def _has_operator(cls, module: nn.Module) -> bool:
        op = _get(module, cls.OPERATOR)
        return (isinstance(getattr(op, "rg_lru", None), nn.Module)
                and all(isinstance(getattr(op, n, None), nn.Linear) for n in ("linear_x", "linear_y", "linear_out")))


class _NoHeadsMoE(_NoHeads):
    """:class:`_NoHeads` for a layer whose FFN is a mixture of experts in the layout of the :class:`_HFMoEBlock`
    subclass it is mixed into."""

    @classmethod
    def _has_ffn(cls, module: nn.Module) -> bool:
        ex = _get(module, cls.EXPERTS)  # type: ignore[attr-defined]
        gu, dn = (getattr(ex, n, None) for n in cls.EXPERT_PARAMS)  # type: ignore[attr-defined]
        return (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == dn.dim() == 3
                and cls._expert_layout(gu, dn))  # type: ignore[attr-defined]


class _HFLinearAttentionMoEBlock(_NoHeadsMoE, _HFMoEBlock):
    """Qwen3-Next's and Qwen3.5-MoE's layers with a linear attention (``linear_attn``) in place of the softmax
    attention: the mixture of experts (and gated shared expert) of :class:`_HFMoEBlock`, no heads."""

    kind = "hf_linear_attn_moe"
    OPERATOR = "linear_attn"


class _HFMiniMaxBlock(_HFMoEBlock):
    """MiniMax's (MiniMax-Text-01, MiniMax-M1) softmax-attention layers: the Llama attention and the mixture of
    :class:`_HFMoEBlock`, in DeepNorm's order: ``h = input_layernorm(x)``, ``h' = post_attention_layernorm(a_1 h +
    b_1 attn(h))``, output ``a_2 h' + b_2 moe(h')``. The heads' residual is the attention's input times ``a_1``
    (``attn_alpha_factor``, :meth:`residual_scale`) and their output scale ``b_1`` (``attn_beta_factor``)."""

    kind = "hf_minimax"
    FACTORS = ("attn_alpha_factor", "attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (all(isinstance(getattr(module, f, None), (int, float)) for f in cls.FACTORS)
                and super().matches(module))

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | None:
        return (_get(self.module, self.SA), 0) if stage == "heads" else super().residual_input(stage)

    def residual_scale(self, stage: str) -> float | None:
        return float(self.module.attn_alpha_factor) if stage == "heads" else None

    def output_scale(self, stage: str) -> torch.Tensor | None:
        if stage != "heads":
            return None
        out = self.out_proj
        return torch.full((out.out_features,), float(self.module.attn_beta_factor), dtype=out.weight.dtype)


class _HFMiniMaxLightningBlock(_NoHeadsMoE, _HFMoEBlock):
    """MiniMax's (MiniMax-Text-01) layers with a lightning attention (``self_attn``: a linear attention with fused
    ``qkv_proj``, ``output_gate`` and ``out_proj``, no heads the adapter prunes) in place of the softmax attention:
    the mixture of experts of :class:`_HFMoEBlock`, no heads."""

    kind = "hf_minimax_lightning"
    OPERATOR = "self_attn"

    @classmethod
    def _has_operator(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.OPERATOR)
        return all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("qkv_proj", "out_proj", "output_gate"))


class _DeltaAttention(_NoHeads):
    """A layer whose ``self_attn`` is a gated delta-rule linear attention (Kimi Linear's KDA, Ring-linear's
    ``BailingHybridDeltaAttention``: query/key/value projections through a short convolution ``conv1d``, a
    ``forget_gate`` and a ``b_proj`` beta, its own recurrent state), mixed into the adapter of the layer's FFN: the
    FFN is pruned, the linear attention is kept whole (no "heads" stage; its spec records ``num_heads`` 0)."""

    OPERATOR = "self_attn"

    @classmethod
    def _has_operator(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.OPERATOR)
        return (isinstance(getattr(sa, "conv1d", None), nn.Conv1d)
                and isinstance(getattr(sa, "b_proj", None), nn.Linear)
                and isinstance(getattr(sa, "forget_gate", None), nn.Module))


class _HFDeltaAttentionBlock(_DeltaAttention, _HFLlamaBlock):
    """Kimi Linear's and Ring-linear's (``BailingHybrid``) delta-attention layers with a dense gated FFN (``mlp``,
    Llama's): the FFN of :class:`_HFLlamaBlock`, no heads. Their full-attention layers are latent attention
    (``hf_mla`` / ``hf_mla_moe``)."""

    kind = "hf_delta_attn"


class _HFDeltaAttentionMoEBlock(_DeltaAttention, _NoHeadsMoE, _HFMoEBlock):
    """Kimi Linear's and Ring-linear's delta-attention layers with a mixture of experts (and shared expert) in
    :class:`_HFMoEBlock`'s layout, no heads."""

    kind = "hf_delta_attn_moe"


class _HFLfm3ConvBlock(_NoHeads, _HFLfm3Block):
    """LFM3's convolution layers: the FFN (and its output norm) of :class:`_HFLfm3Block`, no heads."""

    kind = "hf_lfm3_conv"
    OPERATOR = "conv"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return super().matches(module) and isinstance(_get(module, cls.OUT_NORMS["ffn"]), nn.Module)


class _GraniteHybrid:
    """Mixed into the Granite 4.0 hybrid adapters: the hybrid's layers hold a ``mamba`` attribute (None in the
    attention layers), GraniteMoE's and GraniteMoE-Shared's do not."""

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return hasattr(module, "mamba") and super().matches(module)  # type: ignore[misc]


class _HFGraniteHybridBlock(_GraniteHybrid, _FusedGateUp):
    """Granite 4.0 hybrid decoder layers with attention (``GraniteMoeHybridDecoderLayer``): the Llama attention,
    the FFN ``shared_mlp`` (``input_linear``: gate and up fused in halves; ``output_linear``), both sublayers'
    outputs times ``residual_multiplier`` before the residual sums. The variants with a mixture of experts beside
    ``shared_mlp`` are :class:`_HFGraniteHybridMoEBlock`."""

    kind = "hf_granite_hybrid"
    UP, DOWN = "shared_mlp.input_linear", "shared_mlp.output_linear"


class _HFGraniteHybridMambaBlock(_NoHeads, _HFGraniteHybridBlock):
    """Granite 4.0 hybrid layers with a Mamba-2 mixer (``mamba``) in place of the attention: the FFN of
    :class:`_HFGraniteHybridBlock`, no heads."""

    kind = "hf_granite_hybrid_mamba"
    OPERATOR = "mamba"


class _HFGraniteHybridMoEBlock(_GraniteHybrid, _HFGraniteMoEBlock):
    """Granite 4.0 hybrid layers with attention and a mixture of experts (``block_sparse_moe`` beside the dense
    ``shared_mlp``, both reading the normalised input, their sum times ``residual_multiplier``; Granite 4.0 H Tiny
    and Small): the experts and ``shared_mlp`` are pruned as GraniteMoE-Shared's."""

    kind = "hf_granite_hybrid_moe"


class _HFGraniteHybridMambaMoEBlock(_NoHeadsMoE, _HFGraniteHybridMoEBlock):
    """Granite 4.0 hybrid layers with a Mamba-2 mixer and a mixture of experts: the experts of
    :class:`_HFGraniteHybridMoEBlock`, no heads."""

    kind = "hf_granite_hybrid_mamba_moe"
    OPERATOR = "mamba"


class _HFJambaBlock(_HFLlamaBlock):
    """Jamba's attention layers with a dense FFN (``JambaAttentionDecoderLayer``): the Llama attention, the gated
    FFN ``feed_forward.{gate,up,down}_proj``, RMS norms ``input_layernorm`` / ``pre_ff_layernorm``, pre-norm."""

    kind = "hf_jamba"
    GATE, UP, DOWN = "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"
    RESID_FFN = ("pre_ff_layernorm", 0)  # x + feed_forward(pre_ff_layernorm(x))

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        # Falcon-H1's layers have the same part names with a Mamba mixer beside the attention: not this layout
        return super().matches(module) and _get(module, "mamba") is None


class _HFFalconH1Block(_HFJambaBlock):
    """Falcon-H1's layers (``FalconH1DecoderLayer``): a Mamba-2 mixer (``mamba``) and the Llama attention run in
    parallel on the normalised input, their outputs times ``ssm_out_multiplier`` / ``attn_out_multiplier`` summed
    into the residual; then Jamba's gated FFN ``feed_forward.{gate,up,down}_proj`` after ``pre_ff_layernorm``, its
    gate input times ``gate_multiplier`` (inside the activation: a unit is still row ``i`` of gate and up) and its
    output times ``down_multiplier`` (read as an output scale). The heads' residual is the sum entering the FFN's
    norm minus the attention's output, which holds the Mamba branch (:class:`BranchSum`)."""

    kind = "hf_falcon_h1"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (super(_HFJambaBlock, cls).matches(module) and isinstance(_get(module, "mamba"), nn.Module)
                and isinstance(getattr(_get(module, "feed_forward"), "down_multiplier", None), (int, float))
                and isinstance(getattr(module, "attn_out_multiplier", None), (int, float)))

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | BranchSum | None:
        """The heads' residual: the sum entering ``pre_ff_layernorm`` (block input, Mamba branch, attention) minus
        the attention's output (:class:`BranchSum`)."""
        entry = super().residual_input("ffn")
        return BranchSum(*entry) if stage == "heads" and isinstance(entry, tuple) else super().residual_input(stage)

    def output_scale(self, stage: str) -> torch.Tensor | None:
        """The FFN's ``down_multiplier`` and the attention's ``attn_out_multiplier`` as per-channel factors
        (``None`` where 1)."""
        m = _get(self.module, "feed_forward").down_multiplier if stage == "ffn" else self.module.attn_out_multiplier
        lin = self.down if stage == "ffn" else self.out_proj
        return None if m == 1 else torch.full((lin.out_features,), float(m), dtype=lin.weight.dtype)


class _HFJambaMoEBlock(_HFMoEBlock):
    """Jamba's attention layers with a mixture of experts (``feed_forward``: ``JambaSparseMoeBlock``, experts
    ``gate_up_proj`` ``(E, 2 I, H)`` / ``down_proj`` ``(E, H, I)`` as :class:`_HFMoEBlock`'s, no shared expert)."""

    kind = "hf_jamba_moe"
    EXPERTS, MLP = "feed_forward.experts", "feed_forward"
    RESID_FFN = ("pre_ff_layernorm", 0)
    SHARED: tuple[str, ...] = ()
    SHARED_GATE = None

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return super().matches(module) and _get(module, "mamba") is None  # as _HFJambaBlock's


class _HFJambaMambaBlock(_NoHeads, _HFJambaBlock):
    """Jamba's Mamba layers with a dense FFN (``JambaMambaDecoderLayer``): the FFN of :class:`_HFJambaBlock`, no
    heads."""

    kind = "hf_jamba_mamba"
    OPERATOR = "mamba"


class _HFJambaMambaMoEBlock(_NoHeadsMoE, _HFJambaMoEBlock):
    """Jamba's Mamba layers with a mixture of experts: the experts of :class:`_HFJambaMoEBlock`, no heads."""

    kind = "hf_jamba_mamba_moe"
    OPERATOR = "mamba"


class _NoFFN:
    """A hybrid stack's attention layer without an FFN (NemotronH: one mixer per layer, attention in some, an FFN
    in others), mixed into the adapter of a Llama-style attention: its heads are pruned, it has no FFN (the "ffn"
    stage skips it; its spec records ``intermediate_size`` 0)."""

    has_ffn = False

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)  # type: ignore[attr-defined]
        return (isinstance(sa, nn.Module)
                and all(isinstance(getattr(sa, n, None), nn.Linear) for n in cls.QKV)  # type: ignore[attr-defined]
                and isinstance(_get(module, cls.OUT), nn.Linear)  # type: ignore[attr-defined]
                and isinstance(getattr(sa, cls.HEAD_SIZE, None), int)  # type: ignore[attr-defined]
                and not any(isinstance(m, nn.Linear) for n, m in sa.named_children()
                            if n not in cls.QKV and n != cls.OUT.rpartition(".")[2])  # type: ignore[attr-defined]
                and cls._operator_only(module))

    @classmethod
    def _operator_only(cls, module: nn.Module) -> bool:
        """Whether ``module`` holds nothing besides the attention and its norm (no FFN of some other layout)."""
        return {n for n, _ in module.named_children()} == {cls.SA.partition(".")[0],  # type: ignore[attr-defined]
                                                           cls.RESID_FFN[0]}  # type: ignore[attr-defined]

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        """None: the attention's residual sum is the block output (no FFN after it)."""
        return None

    @property
    def ffn_units(self) -> int:
        return 0

    @property
    def producers(self) -> list[nn.Linear]:
        return []

    @property
    def gated(self) -> bool:
        return False

    def prepare_ffn(self) -> None:
        """No FFN: nothing to prepare."""

    def shrink_ffn(self, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None) -> None:
        if keep.numel():
            raise ValueError(f"block {self.name!r} has no FFN")  # type: ignore[attr-defined]


class _HFNemotronHAttentionBlock(_NoFFN, _HFLlamaBlock):
    """NemotronH's (Nemotron-H, Nemotron Nano 2 and 3) attention layers (``NemotronHBlock`` whose ``mixer`` is a
    ``NemotronHAttention``: ``x + mixer(norm(x))``, grouped-query attention without position embeddings): the heads
    of :class:`_HFLlamaBlock`, no FFN. Its Mamba-2 layers are run as they are (:class:`OpaqueLayer`)."""

    kind = "hf_nemotron_h_attn"
    SA, OUT = "mixer", "mixer.o_proj"
    RESID_FFN = ("norm", 0)


class _HFNemotronHMLPBlock(_NoHeads, _HFLlamaPlainBlock):
    """NemotronH's FFN layers (``NemotronHBlock`` whose ``mixer`` is a ``NemotronHMLP``: ``x + mixer(norm(x))``,
    ``mixer.down_proj(relu(mixer.up_proj(h))^2)``): the plain FFN of :class:`_HFLlamaPlainBlock`, no heads."""

    kind = "hf_nemotron_h_mlp"
    OPERATOR = "mixer"
    UP, DOWN = "mixer.up_proj", "mixer.down_proj"
    RESID_FFN = ("norm", 0)  # the block input: the residual of x + mixer(norm(x))

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return super().matches(module) and {n for n, _ in module.named_children()} == {"mixer", "norm"} and {
            n for n, m in module.mixer.named_children() if isinstance(m, nn.Linear)} == {"up_proj", "down_proj"}


class _HFNemotronHMoEBlock(_NoHeadsMoE, _HFMoEBlock):
    """NemotronH's mixture-of-experts layers (``NemotronHBlock`` whose ``mixer`` is a ``NemotronHMoE``:
    ``x + mixer(norm(x))``; Nemotron 3 Nano): plain experts ``mixer.experts.up_proj`` ``(E, I, H)`` and
    ``down_proj`` ``(E, H, I)``, each expert ``down_e(relu(up_e(x))^2)``, the routing-weighted sum plus the plain
    shared expert ``mixer.shared_experts``; the mixture of :class:`_HFMoEBlock` otherwise, no heads. A mixture
    whose experts run in a latent space (``fc1_latent_proj`` / ``fc2_latent_proj``) is refused."""

    kind = "hf_nemotron_h_moe"
    OPERATOR = "mixer"
    EXPERTS, MLP = "mixer.experts", "mixer"
    SHARED: tuple[str, ...] = ("mixer.shared_experts",)
    SHARED_GATE = None
    RESID_FFN = ("norm", 0)
    FFN_PARTS = 1
    EXPERT_PARAMS = ("up_proj", "down_proj")

    @staticmethod
    def _expert_layout(up: torch.Tensor, down: torch.Tensor) -> bool:
        """Whether the experts' tensors have this layout's shapes: ``(E, I, H)`` and ``(E, H, I)``."""
        return up.shape[0] == down.shape[0] and up.shape[1] == down.shape[2] and up.shape[2] == down.shape[1]

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return super().matches(module) and {n for n, _ in module.named_children()} == {"mixer", "norm"}

    def prepare_ffn(self) -> None:
        mixer = _get(self.module, self.MLP)
        latent = [n for n in ("fc1_latent_proj", "fc2_latent_proj")
                  if not isinstance(getattr(mixer, n, None), (nn.Identity, type(None)))]
        if latent:
            raise ValueError(f"block {self.name!r}: its experts run in a latent space ({', '.join(latent)} around "
                             "them), which the expert adapter does not model; this model's mixtures cannot be "
                             "pruned by the transformer adapter (its dense FFN layers and heads can: pass keep= a "
                             "mapping without these blocks, or target='heads').")
        super().prepare_ffn()

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s intermediate activations ``act(up(x))`` on the token rows ``x``."""
        return self.experts.act_fn(F.linear(x, self.experts.up_proj[e]))

    def expert_magnitude(self, e: int) -> torch.Tensor:
        """Per neuron of expert ``e``: the sum of the squared L2 norms of its up row and down column (float64)."""
        ex = self.experts
        return ex.up_proj[e].detach().double().pow(2).sum(1) + ex.down_proj[e].detach().double().pow(2).sum(0)


class OpaqueLayer(_Block):
    """A layer of a stack of blocks that the adapter does not recognise (a hybrid model's Mamba or linear-attention
    layer without an FFN it knows): never pruned, run as it is between the blocks it sits between, with the
    arguments the model called it with (its hidden states first; the first output where it returns several).

    ``grid``: the layer reads the tokens laid out as an image, ``(batch, features, height, width)``, which the
    model made of the previous layer's ``(batch, height * width, features)`` output outside any module (SegFormer's
    stages); ``forward`` lays them out so first."""

    kind = "opaque"
    has_heads = has_ffn = False

    def __init__(self, name: str, module: nn.Module, grid: tuple[int, int] | None = None) -> None:
        super().__init__(name, module)
        self.grid = grid

    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        if self.grid is not None:
            h, w = self.grid
            if x.dim() != 3 or x.shape[1] != h * w:
                raise ValueError(f"layer {self.name!r} reads the tokens as an image of {h}x{w}, the size of the first "
                                 f"calibration batch's, but receives {tuple(x.shape)}: calibrate on images of one "
                                 "size")
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        out = self.module(x, *ctx["args"], **ctx["kwargs"])
        if isinstance(out, torch.Tensor):
            return out
        first = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else None
        if not isinstance(first, torch.Tensor):
            raise ValueError(f"layer {self.name!r} ({type(self.module).__name__}), which the pruner runs as it is "
                             f"between the blocks it prunes, returns {type(out).__name__}, not the hidden states "
                             "(a tensor, or a tuple that starts with them)")
        return first


def link_opaque_layers(model: nn.Module, blocks: list[_Block]) -> list[tuple[str, nn.Module]]:
    """Set each block's :attr:`_Block.before`: the layers of its stack (the ``ModuleList`` that holds it) between
    the previous block of that stack and itself that are not blocks. Returns every layer of the stacks that is not
    a block, ``(name, module)`` in order (also those before the first block or after the last of a stack, which the
    pruning never runs)."""
    found = {b.name: b for b in blocks}
    others: list[tuple[str, nn.Module]] = []
    for path in sorted({b.name.rpartition(".")[0] for b in blocks}):
        stack = model.get_submodule(path) if path else model
        if not isinstance(stack, nn.ModuleList):
            continue
        pending: list[OpaqueLayer] = []
        seen_block = False
        for i, layer in enumerate(stack):
            name = f"{path}.{i}" if path else str(i)
            if name in found:
                if seen_block:
                    found[name].before = tuple(pending)
                pending, seen_block = [], True
            else:
                others.append((name, layer))
                pending.append(OpaqueLayer(name, layer))
    return others


class _ScaledNorm(nn.Module):
    """``scale * norm(y)``: a norm after a consumer whose output the layer then multiplies by a number (HyperCLOVAX's
    peri-LN norms and ``residual_multiplier``), seen as one norm by the refit (its gains include the number)."""

    def __init__(self, norm: nn.Module, scale: float) -> None:
        super().__init__()
        self.norm = norm
        self.scale = float(scale)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.norm(y) * self.scale


class _HFHyperCLOVAXBlock(_HFLlamaBlock):
    """HyperCLOVAX decoder layers: the Llama parts, with RMS norms on the attention and FFN outputs before the
    residual sums (``post_norm1`` / ``post_norm2``, "peri-LN", where ``use_post_norm``; identities otherwise) and
    those outputs multiplied by ``residual_multiplier``: ``x + m * post_norm1(attn(input_layernorm(x)))``. The
    refit treats ``m * post_norm`` as the norm after the consumer (see :class:`_HFGemma2Block`)."""

    kind = "hf_hyperclovax"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("post_norm1", "post_norm2"))
                and super().matches(module))

    def output_norm(self, stage: str) -> nn.Module | None:
        norm = self.module.post_norm2 if stage == "ffn" else self.module.post_norm1
        if isinstance(norm, nn.Identity):
            return None
        m = getattr(self.module, "residual_multiplier", 1.0)
        return norm if m == 1 else _ScaledNorm(norm, m)

    def output_scale(self, stage: str) -> torch.Tensor | None:
        return None if self.output_norm(stage) is not None else super().output_scale(stage)


class _SandwichNorms:
    """Norms applied to the attention's and the FFN's outputs before their residual sums (:attr:`OUT_NORMS`, read
    by :meth:`output_norm`), which the refit's targets and weights account for."""

    RESID_FFN = ("pre_feedforward_layernorm", 0)  # x + post_ffn_norm(mlp(pre_feedforward_layernorm(x)))
    #: The norms applied to the attention and FFN outputs before their residual sums.
    OUT_NORMS = {"heads": "post_attention_layernorm", "ffn": "post_feedforward_layernorm"}
    #: Parts a block of the kind must have (``FORBIDDEN``: must not; they tell the layouts apart).
    REQUIRED: tuple[str, ...] = ("input_layernorm", "pre_feedforward_layernorm")
    FORBIDDEN: tuple[str, ...] = ()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (super().matches(module)  # type: ignore[misc]
                and all(isinstance(_get(module, p), nn.Module) for p in (*cls.OUT_NORMS.values(), *cls.REQUIRED))
                and not any(_get(module, p) is not None for p in cls.FORBIDDEN))

    def output_norm(self, stage: str) -> nn.Module | None:
        return _get(self.module, self.OUT_NORMS[stage])  # type: ignore[attr-defined]


class _HFGemma2Block(_SandwichNorms, _HFLlamaBlock):
    """Gemma 2 and Gemma 3 decoder layers (``Gemma2DecoderLayer``, ``Gemma3DecoderLayer``): the Llama parts with
    "sandwich" RMS norms, ``x + post_attention_layernorm(attn(input_layernorm(x)))`` then ``x +
    post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``. The consumer output is normalised before the
    residual sum (:meth:`output_norm`), which the refit's targets and weights account for. Their layers alternate
    sliding-window and global attention, each type with its mask and rotary tables: every layer is replayed with
    its own arguments."""

    kind = "hf_gemma2"


class _HFAfmoeBlock(_HFGemma2Block):
    """Arcee's AFMoE dense decoder layers (``AfmoeDecoderLayer``, the Trinity models' first layers): Gemma 2's
    sandwich norms under other names (``pre_mlp_layernorm`` / ``post_mlp_layernorm``), an attention output gate
    per channel (``self_attn.gate_proj``, cut with its heads) and per-head query and key norms."""

    kind = "hf_afmoe"
    RESID_FFN = ("pre_mlp_layernorm", 0)
    OUT_NORMS = {"heads": "post_attention_layernorm", "ffn": "post_mlp_layernorm"}
    REQUIRED = ("input_layernorm", "pre_mlp_layernorm")


class _HFAfmoeMoEBlock(_SandwichNorms, _HFMoEBlock):
    """AFMoE's mixture-of-experts layers: :class:`_HFAfmoeBlock`'s norms and attention, the FFN a mixture in
    transformers 5's layout (``mlp.experts``; sigmoid routing with a bias that only picks the experts) with a
    shared expert ``mlp.shared_experts``. Each expert is fitted to its own output (see :class:`_HFMoEBlock`), not
    through the norm after the mixture."""

    kind = "hf_afmoe_moe"
    RESID_FFN = _HFAfmoeBlock.RESID_FFN
    OUT_NORMS = _HFAfmoeBlock.OUT_NORMS
    REQUIRED = _HFAfmoeBlock.REQUIRED


class _HFGemma4Block(_HFGemma2Block):
    """Gemma 4 text decoder layers (``Gemma4TextDecoderLayer``): Gemma 2's sandwich norms and parts, per-head
    ``q_norm`` / ``k_norm`` and a weightless ``v_norm``, then, after the FFN's residual sum, the per-layer input of
    the E models (``per_layer_input_gate`` ... ``post_per_layer_input_norm``, added as another residual term) and a
    multiplication by ``layer_scalar``. The global layers may take their values from the keys (``attention_k_eq_v``:
    no ``v_proj``; a key/value group is then its key rows). In the E models the last layers reuse the keys and
    values of the last earlier layer of their type (``num_kv_shared_layers``; handed on in ``shared_kv_states``,
    which the pruner gives each network it runs, see ``_STREAM_STATES`` in nn_adapters/transformer.py), and may have
    an FFN twice as wide (``use_double_wide_mlp``): their FFNs are pruned, and their query heads with
    ``head_unit="query"`` (the keys and values, reused, stay), but not their key/value groups (a reused group would
    have to go in every layer at once). Layers with a mixture of experts beside the MLP (``enable_moe_block``) are
    :class:`_HFGemma4MoEBlock`'s; where their experts are not in transformers 5's layout, their FFN is refused here
    (their heads are pruned)."""

    kind = "hf_gemma4"
    #: The first module of the per-layer input's term, whose input is the FFN's residual sum: Gemma 4's gate, or
    #: EmbeddingGemma 2's ``ple_block`` (the whole term in one module).
    PER_LAYER_INPUT = ("per_layer_input_gate", "ple_block")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        if not isinstance(getattr(module, "layer_scalar", None), torch.Tensor) or sa is None:
            return False
        shared = bool(getattr(sa, "is_kv_shared_layer", False))  # no key/value projections of its own
        return (isinstance(getattr(sa, "q_proj", None), nn.Linear) and isinstance(_get(module, cls.OUT), nn.Linear)
                and (shared or isinstance(getattr(sa, "k_proj", None), nn.Linear))
                and (shared or isinstance(getattr(sa, "v_proj", None), nn.Linear)
                     or (getattr(sa, "v_proj", 0) is None and getattr(sa, "use_alternative_attention", False)))
                and all(isinstance(_get(module, p), nn.Linear) for p in (cls.GATE, cls.UP, cls.DOWN))
                and all(isinstance(_get(module, p), nn.Module) for p in (*cls.OUT_NORMS.values(), *cls.REQUIRED)))

    def prepare_ffn(self) -> None:
        if getattr(self.module, "enable_moe_block", False):  # its experts are not in transformers 5's layout
            raise ValueError(f"block {self.name!r}: its FFN is an MLP and a mixture of experts in parallel "
                             "(enable_moe_block) whose experts the transformer adapter does not recognise; prune "
                             "target='heads' on this model.")
        super().prepare_ffn()

    def prepare_heads(self) -> None:
        sa = _get(self.module, self.SA)
        # a layer that stores its keys and values for later layers: transformers >= 5.24 marks the last layer of
        # each type so even when no layer reuses them (num_kv_shared_layers == 0)
        reused = getattr(getattr(sa, "config", None), "num_kv_shared_layers", 1) != 0
        sharing = getattr(sa, "is_kv_shared_layer", False) or (getattr(sa, "store_full_length_kv", False) and reused)
        if sharing and not (QUERY_HEADS.get() and self.kv_groups > 1):  # query heads alone leave the keys and values
            raise ValueError(f"block {self.name!r}: its attention shares its keys and values with other layers (a "
                             "Gemma 4 model with num_kv_shared_layers > 0: later layers reuse them), so its "
                             "key/value groups cannot be removed from one layer alone: prune target='ffn' on this "
                             "model, or its query heads alone (head_unit='query').")
        super().prepare_heads()

    def set_sizes(self, intermediate_size: int, num_heads: int) -> None:
        if getattr(_get(self.module, self.SA), "is_kv_shared_layer", False) and num_heads == self.num_heads:
            self.shrink_ffn(torch.arange(intermediate_size))  # no key/value projections to cut
            return
        super().set_sizes(intermediate_size, num_heads)

    def last_sum_probe(self) -> tuple[nn.Module, int] | None:
        for name in self.PER_LAYER_INPUT:
            first = getattr(self.module, name, None)
            if isinstance(first, nn.Module):
                return first, 0
        return None

    def output_factor(self) -> torch.Tensor | None:
        return self.module.layer_scalar.detach()


class _HFGemma4MoEBlock(_HFGemma4Block, _HFMoEBlock):
    """Gemma 4 layers with a mixture of experts beside the MLP (``enable_moe_block``: the 26B-A4B model), with
    :class:`_HFGemma4Block`'s attention, norms and layer scalar: ``x + post_feedforward_layernorm(
    post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(x))) + post_feedforward_layernorm_2(experts(
    pre_feedforward_layernorm_2(x))))``, the router reading ``x``. The experts (transformers 5's 3D layout) each keep
    ``keep`` of their neurons; the MLP, read by every token, is pruned by the same fraction as a shared expert on
    its own input (:attr:`_HFMoEBlock.SHARED_OWN_INPUT`). Each is fitted to its own output, as every mixture's
    experts are, not through the norms after them."""

    kind = "hf_gemma4_moe"
    EXPERTS = "experts"
    MLP = "-"  # no mixture module: the layer combines the MLP's and the experts' outputs itself
    ROUTERS = ("router",)
    SHARED: tuple[str, ...] = ("mlp",)
    SHARED_GATE = None
    SHARED_OUTSIDE = True
    SHARED_OWN_INPUT = True
    prepare_ffn = _HFMoEBlock.prepare_ffn

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        ex = _get(module, cls.EXPERTS)
        gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
        return (bool(getattr(module, "enable_moe_block", False)) and isinstance(gu, nn.Parameter)
                and isinstance(dn, nn.Parameter) and gu.dim() == dn.dim() == 3 and cls._expert_layout(gu, dn)
                and _SharedExpert.looks_like(_get(module, "mlp")) and _HFGemma4Block.matches(module))


class _HFOlmo2Block(_HFGemma2Block):
    """OLMo 2 and 3, EXAONE 4 decoder layers (``Olmo2DecoderLayer``...): norms after the sublayers only, ``x +
    post_attention_layernorm(attn(x))`` then ``x + post_feedforward_layernorm(mlp(x))``, with the Llama parts.
    OLMo's attention normalises its queries and keys over all heads together (``q_norm`` / ``k_norm`` of the
    projections' full width): its heads are refused (by :meth:`_HFLlamaBlock.prepare_heads`, as OLMoE's); EXAONE
    4's norms act per head, its heads are pruned."""

    kind = "hf_olmo2"
    RESID_FFN = ("mlp", 0)  # x + post_feedforward_layernorm(mlp(x))
    REQUIRED = ()
    FORBIDDEN = ("input_layernorm", "pre_feedforward_layernorm")


class _HFGlm4Block(_FusedGateUp, _HFGemma2Block):
    """GLM-4 decoder layers (``Glm4DecoderLayer``: the GLM-4-0414 models): GLM's parts with RMS norms after the
    sublayers as well, ``x + post_self_attn_layernorm(attn(input_layernorm(x)))`` then ``x + post_mlp_layernorm(
    mlp(post_attention_layernorm(x)))`` (read by :meth:`_Block.output_norm`, as Gemma 2's)."""

    kind = "hf_glm4"
    RESID_FFN = ("post_attention_layernorm", 0)  # x + post_mlp_layernorm(mlp(post_attention_layernorm(x)))
    OUT_NORMS = {"heads": "post_self_attn_layernorm", "ffn": "post_mlp_layernorm"}
    REQUIRED = ("input_layernorm",)


class _HFKolibri1Block(_SandwichNorms, _HFMoEBlock):
    """Kolibri1 decoder layers (``Kolibri1DecoderLayer``): GLM-4's sandwich norms (``post_self_attn_layernorm``
    after the attention, ``post_attention_layernorm`` before the FFN, ``post_mlp_layernorm`` after it) around a
    mixture of experts in transformers 5's layout with shared experts; per-head query and key norms. The heads'
    refit reads the norm after the attention; each expert is fitted to its own output (see :class:`_HFMoEBlock`)."""

    kind = "hf_kolibri1"
    RESID_FFN = _HFGlm4Block.RESID_FFN
    OUT_NORMS = {"heads": "post_self_attn_layernorm", "ffn": "post_mlp_layernorm"}
    REQUIRED = ("input_layernorm",)


class _ParallelBranches(_HFBlock):
    """Attention and FFN read one norm and are summed in parallel, ``x + attn(norm(x)) + mlp(norm(x))`` (GPT-J,
    Phi, Cohere): no norm between the two sums, and each branch's residual is the block output minus that branch."""

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _get(module, "post_attention_layernorm") is None and super().matches(module)

    def residual_input(self, stage: str) -> str:
        return BLOCK_OUTPUT


class _HFPhiBlock(_ParallelBranches, _HFLlamaBlock):
    """Phi-1, Phi-1.5 and Phi-2 (``PhiDecoderLayer``): ``self_attn.{q,k,v}_proj``, ``self_attn.dense``, the plain
    FFN ``mlp.fc1 / fc2``, one LayerNorm ``input_layernorm`` read by both branches, summed in parallel:
    ``x + attn(norm(x)) + mlp(norm(x))``. Attention units are key/value groups, as for the Llama-style decoders."""

    kind = "hf_phi"
    OUT = "self_attn.dense"
    GATE, UP, DOWN = None, "mlp.fc1", "mlp.fc2"
    RESID_FFN = ("input_layernorm", 0)  # what the layout is recognised by; the residual is read from the output
    PLAIN = frozenset({"dropout", "rotary_emb", "q_layernorm", "k_layernorm"})


class _HFStarcoder2Block(_HFLlamaBlock):
    """StarCoder2 (``Starcoder2DecoderLayer``): the Llama-style attention (``self_attn.{q,k,v,o}_proj``, grouped
    query attention) with a plain FFN ``mlp.c_fc / c_proj`` and LayerNorms, pre-LN."""

    kind = "hf_starcoder2"
    GATE, UP, DOWN = None, "mlp.c_fc", "mlp.c_proj"


class _HFStableLmBlock(_HFLlamaBlock):
    """StableLM (``StableLmDecoderLayer``): the Llama-style attention and gated FFN with LayerNorms, pre-LN, the
    attention and FFN one after the other or in parallel (``use_parallel_residual``). Its attention sizes its views
    by ``num_heads`` and ``num_key_value_heads``, which follow the removed key/value groups or query heads (so do
    ``hidden_size`` where it is kept); its per-head query and key LayerNorms (``qk_layernorm``: ``q_layernorm`` /
    ``k_layernorm``, a LayerNorm for each head in ``norms``) lose the removed heads' norms."""

    kind = "hf_stablelm"
    RESID_FFN = ("input_layernorm", 0)  # what the layout is recognised by; residual_input says where it is read
    # transformers 4 holds the dropout as a module; the per-head norms are cut by shrink_heads
    PLAIN = _HFLlamaBlock.PLAIN | {"attention_dropout", "q_layernorm", "k_layernorm"}

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(getattr(module, "use_parallel_residual", None), bool) and super().matches(module)

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | None:
        if self.module.use_parallel_residual:
            return BLOCK_OUTPUT
        return (self.module.post_attention_layernorm, 0) if stage == "ffn" else None

    def prepare_heads(self) -> None:
        _HFBlock.prepare_heads(self)  # the head counts it keeps are updated below, not refused
        sa = _get(self.module, self.SA)
        for part, count in (("q_layernorm", self.num_heads), ("k_layernorm", self.num_heads // self.kv_groups)):
            norms = getattr(getattr(sa, part, None), "norms", None)
            if getattr(sa, part, None) is not None and (not isinstance(norms, nn.ModuleList) or len(norms) != count):
                raise ValueError(f"block {self.name!r}: its {part} is not one norm for each of its {count} heads; "
                                 "prune target='ffn' on this model.")
        self._mark_head_units()

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        groups, n_kv, query = self.kv_groups, self.num_heads // self.kv_groups, self.query_heads
        super().shrink_heads(keep, out_weight, out_bias)
        sa, kept = _get(self.module, self.SA), [int(h) for h in keep]
        heads = kept if query else [g * groups + j for g in kept for j in range(groups)]
        kv = list(range(n_kv)) if query else kept
        for part, rows in (("q_layernorm", heads), ("k_layernorm", kv)):
            per_head = getattr(sa, part, None)
            if per_head is not None:  # checked by prepare_heads: a LayerNorm for each head
                per_head.norms = nn.ModuleList([per_head.norms[h] for h in rows])
                per_head.num_heads = len(rows)
        sa.num_key_value_heads, sa.num_heads = len(kv), len(heads)
        if hasattr(sa, "hidden_size"):
            sa.hidden_size = len(heads) * self.head_dim


class _HFVaultGemmaBlock(_HFLlamaBlock):
    """VaultGemma (``VaultGemmaDecoderLayer``): Gemma's attention and gated FFN, pre-norm, the norm before the FFN
    named ``pre_feedforward_layernorm`` (and none after the sublayers, unlike Gemma 2 and 3)."""

    kind = "hf_vaultgemma"
    RESID_FFN = ("pre_feedforward_layernorm", 0)  # x + mlp(pre_feedforward_layernorm(x))

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (all(_get(module, n) is None for n in ("post_attention_layernorm", "post_feedforward_layernorm"))
                and super().matches(module))


class _HFCohereBlock(_ParallelBranches, _HFLlamaBlock):
    """Cohere Command-R (``CohereDecoderLayer``): the Llama-style attention and gated FFN, one LayerNorm
    ``input_layernorm`` read by both branches, summed in parallel: ``x + attn(norm(x)) + mlp(norm(x))``."""

    kind = "hf_cohere"
    RESID_FFN = ("input_layernorm", 0)  # what the layout is recognised by; the residual is read from the output


class _HFCohere2MoEBlock(_ParallelBranches, _HFMoEBlock):
    """Cohere's mixture-of-experts decoder layers (``Cohere2MoeDecoderLayer``): Cohere's parallel layout, ``x +
    attn(norm(x)) + moe(norm(x))`` with one LayerNorm ``input_layernorm``, the experts in transformers 5's 3D
    tensors (``mlp.experts``) and, where ``num_shared_experts`` > 0, a shared expert ``mlp.shared_experts`` added to
    the experts' sum or averaged with it (``shared_expert_combination_strategy="average"``: the mixture returns half
    the sum, :meth:`mixture_factor`)."""

    kind = "hf_cohere2_moe"
    RESID_FFN = _HFCohereBlock.RESID_FFN

    def mixture_factor(self) -> float:
        mlp = _get(self.module, self.MLP)
        average = getattr(mlp, "shared_expert_combination_strategy", "sum") == "average"
        return 0.5 if average and self.shared is not None else 1.0


class _HFGPTNeoBlock(_HFBlock):
    """GPT-Neo (``GPTNeoBlock``): ``attn.attention.{q,k,v,out}_proj``, ``mlp.c_fc / c_proj``, ``ln_1 / ln_2``,
    pre-LN; global and local (windowed) attention layers alike (a local layer applies its window itself)."""

    kind = "hf_gpt_neo"
    SA, QKV, OUT = "attn.attention", ("q_proj", "k_proj", "v_proj"), "attn.attention.out_proj"
    UP, DOWN = "mlp.c_fc", "mlp.c_proj"
    NORM_HEADS = NORM_FFN = "-"
    RESID_FFN = ("ln_2", 0)  # x + mlp(ln_2(x))
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", None
    PLAIN = frozenset({"attn_dropout", "resid_dropout"})


class _HFGPTJBlock(_ParallelBranches, _HFBlock):
    """GPT-J (``GPTJBlock``): ``attn.{q,k,v,out}_proj``, ``mlp.fc_in / fc_out``, one LayerNorm ``ln_1`` read by both
    branches, which are summed in parallel: ``x + attn(ln_1(x)) + mlp(ln_1(x))``. The residual of each branch is
    the block output minus that branch (checked on the first batch)."""

    kind = "hf_gptj"
    SA, QKV, OUT = "attn", ("q_proj", "k_proj", "v_proj"), "attn.out_proj"
    UP, DOWN = "mlp.fc_in", "mlp.fc_out"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN: no LayerNorm after the sum
    RESID_FFN = ("ln_1", 0)  # what the layout is recognised by; the residual itself is read from the block output
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_attention_heads", "head_dim", None
    PLAIN = frozenset({"attn_dropout", "resid_dropout"})


class _HFCodeGenBlock(_HFGPTJBlock):
    """CodeGen (``CodeGenBlock``): GPT-J's parallel block with query, key and value fused in ``attn.qkv_proj`` in
    the layout of its 4-way model parallelism (``mp_num = 4``: four equal row blocks, block ``p`` holding the
    queries, then the values, then the keys of heads ``p H/4 ... (p + 1) H/4 - 1``; the attention output, and so
    the output projection's columns, in head order). Every block must keep as many heads (the forward splits the
    projection into 4 equal blocks): heads are kept in multiples of 4, at most a quarter from each block
    (:attr:`head_parts`); the attention's ``embed_dim`` (which sizes the blocks) and head count follow."""

    kind = "hf_codegen"
    QKV = ("qkv_proj",)

    @property
    def head_parts(self) -> int:
        return int(getattr(_get(self.module, self.SA), "mp_num", 4))

    def _qkv_rows(self, keep: torch.Tensor, by_head: bool) -> torch.Tensor:
        """The rows of ``qkv_proj`` of the heads ``keep`` (sorted, as many in every block): in the fused layout
        (block by block, then queries, values, keys) or, with ``by_head``, head by head (each head's query,
        value and key rows together)."""
        parts, per, d = self.head_parts, self.num_heads // self.head_parts, self.head_dim
        block, local = keep // per, keep % per
        if not by_head and bool((torch.bincount(block, minlength=parts) != keep.numel() // parts).any()):
            raise ValueError(f"block {self.name!r}: CodeGen keeps as many heads in each of its {parts} model-parallel "
                             f"blocks; got heads {keep.tolist()}")
        sub = torch.arange(3, device=keep.device).view(1, 3, 1)  # query, value, key
        start = block.view(-1, 1, 1) * 3 * per * d + sub * per * d + local.view(-1, 1, 1) * d  # (heads, 3, 1)
        rows = start + torch.arange(d, device=keep.device).view(1, 1, -1)  # (heads, 3, d)
        if by_head:
            return rows.reshape(-1)
        # block-major, then query / value / key, then the block's kept heads in order
        return rows.view(parts, -1, 3, d).permute(0, 2, 1, 3).reshape(-1)

    def qkv_weights(self) -> list[torch.Tensor]:
        """``qkv_proj``'s weight with each head's rows together (what the magnitude score reads head by head)."""
        w = _get(self.module, self.SA).qkv_proj.weight
        return [w[self._qkv_rows(torch.arange(self.num_heads, device=w.device), by_head=True)]]

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        keep = _index_to(keep, self.out_proj.weight)
        self._cut_attention((self._qkv_rows(keep, by_head=False),), _head_rows(keep, self.head_dim), out_weight,
                            out_bias)
        sa = _get(self.module, self.SA)
        sa.num_attention_heads = int(keep.numel())
        sa.embed_dim = int(keep.numel()) * self.head_dim

    def set_sizes(self, intermediate_size: int, num_heads: int) -> None:
        """As :meth:`_HFBlock.set_sizes`, the heads kept spread evenly over the model-parallel blocks."""
        parts, per = self.head_parts, self.num_heads // self.head_parts
        if num_heads % parts:
            raise ValueError(f"block {self.name!r}: {num_heads} heads cannot be spread evenly over CodeGen's "
                             f"{parts} model-parallel blocks: the spec does not come from this architecture")
        self.shrink_ffn(torch.arange(intermediate_size))
        if num_heads < self.num_heads:
            self.shrink_heads((torch.arange(parts).view(-1, 1) * per + torch.arange(num_heads // parts)).reshape(-1))


class _FusedQKVByHead(_PerHeadBias):
    """A query/key/value projection fused head by head (``QKV[0]``; head ``h`` owns rows ``3 h d ... 3 (h + 1) d -
    1``: its query, key and value, ``d = head_dim``), as in GPT-NeoX and BLOOM; the attention's head count
    ``N_HEADS``, where it keeps one, follows the heads."""

    @property
    def num_heads(self) -> int:
        return int(self.out_proj.in_features) // self.head_dim

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        keep = _index_to(keep, self.out_proj.weight)
        n_before = self.num_heads
        self._cut_attention((_head_rows(keep, 3 * self.head_dim),), _head_rows(keep, self.head_dim), out_weight,
                            out_bias)
        sa = _get(self.module, self.SA)
        if hasattr(sa, self.N_HEADS):
            setattr(sa, self.N_HEADS, int(keep.numel()))
        self._keep_bias_channels(keep, n_before)


class _HFGPTNeoXBlock(_FusedQKVByHead):
    """GPT-NeoX and Pythia (``GPTNeoXLayer``): the fused projection ``attention.query_key_value`` (head by head),
    ``attention.dense``, ``mlp.dense_h_to_4h / dense_4h_to_h``, ``input_layernorm`` / ``post_attention_layernorm``,
    pre-LN; the attention and FFN are summed in parallel (``use_parallel_residual``, Pythia's setting) or one after
    the other. transformers 4 sizes the attention's views by ``num_attention_heads``."""

    kind = "hf_gpt_neox"
    SA, QKV, OUT = "attention", ("query_key_value",), "attention.dense"
    UP, DOWN = "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"
    NORM_HEADS = NORM_FFN = "-"
    RESID_FFN = ("post_attention_layernorm", 0)  # sequential: x + mlp(post_attention_layernorm(x))
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_attention_heads", "head_size", None
    PLAIN = frozenset({"attention_dropout", "rotary_emb"})

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        qkv, dense = getattr(sa, "query_key_value", None), getattr(sa, "dense", None)
        return (
            isinstance(getattr(module, "use_parallel_residual", None), bool)
            and isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)
            and isinstance(getattr(sa, "head_size", None), int)
            and qkv.out_features == 3 * dense.in_features and dense.in_features % sa.head_size == 0
            and all(isinstance(_get(module, p), nn.Linear) for p in (cls.UP, cls.DOWN))
            and all(isinstance(_get(module, p), nn.LayerNorm) for p in ("input_layernorm", "post_attention_layernorm"))
        )

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | None:
        if self.module.use_parallel_residual:
            return BLOCK_OUTPUT
        return super().residual_input(stage)


class _HFGPTNeoXJapaneseBlock(_HFGPTNeoXBlock):
    """GPT-NeoX-Japanese (``GPTNeoXJapaneseLayer``, rinna's and ABEJA's models): GPT-NeoX's parts, one after the
    other, without biases; the attention returns its output projection's bias apart (``dense_bias``, in the last
    layer only), added with the residual. The heads' residual is therefore read as the sum entering
    ``post_attention_layernorm`` minus the output projection's output (:class:`BranchSum`), which carries that bias."""

    kind = "hf_gpt_neox_japanese"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        qkv, dense = getattr(sa, "query_key_value", None), getattr(sa, "dense", None)
        return (
            not hasattr(module, "use_parallel_residual") and hasattr(sa, "dense_bias")
            and isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)
            and isinstance(getattr(sa, "head_size", None), int)
            and qkv.out_features == 3 * dense.in_features and dense.in_features % sa.head_size == 0
            and all(isinstance(_get(module, p), nn.Linear) for p in (cls.UP, cls.DOWN))
            and all(isinstance(_get(module, p), nn.LayerNorm) for p in ("input_layernorm", "post_attention_layernorm"))
        )

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | BranchSum | None:
        if stage == "ffn":
            return (self.module.post_attention_layernorm, 0)
        return BranchSum(self.module.post_attention_layernorm, 0)


class _HFPersimmonBlock(_FusedQKVByHead):
    """Persimmon (``PersimmonDecoderLayer``, also Fuyu's language model): ``self_attn.query_key_value`` fused head
    by head (sized by the attention's ``num_heads``, which follows the heads), per-head query and key LayerNorms
    shared by the heads, ``self_attn.dense``, the plain squared-ReLU FFN ``mlp.dense_h_to_4h / dense_4h_to_h``,
    LayerNorms ``input_layernorm`` / ``post_attention_layernorm``, pre-LN, sequential."""

    kind = "hf_persimmon"
    SA, QKV, OUT = "self_attn", ("query_key_value",), "self_attn.dense"
    UP, DOWN = "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"
    NORM_HEADS = NORM_FFN = "-"
    RESID_FFN = ("post_attention_layernorm", 0)  # x + mlp(post_attention_layernorm(x))
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", None
    PLAIN = frozenset({"attention_dropout", "rotary_emb", "q_layernorm", "k_layernorm"})


class _HFBloomBlock(_FusedQKVByHead):
    """BLOOM (``BloomBlock``): ``self_attention.query_key_value`` (fused head by head), ``self_attention.dense``,
    ``mlp.dense_h_to_4h / dense_4h_to_h``, pre-LN. The attention and the MLP add their residual themselves
    (``self_attention(x, residual)``, ``mlp(x, residual)``; the LayerNorm output with
    ``apply_residual_connection_post_layernorm``). ALiBi's per-head slopes, built by the model for all its heads as
    ``(batch * heads, 1, keys)``, reach a layer that lost heads sliced to its own (:class:`_PerHeadBias`)."""

    kind = "hf_bloom"
    SA, QKV, OUT = "self_attention", ("query_key_value",), "self_attention.dense"
    UP, DOWN = "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"
    NORM_HEADS = NORM_FFN = "-"
    RESID_FFN = ("mlp", 1)  # BloomMLP.forward(hidden_states, residual): dense_4h_to_h(...) + residual
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", None
    PLAIN = frozenset({"attention_dropout"})
    HEAD_BIAS = ("alibi", "batch*heads")

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | None:
        # BloomAttention.forward(hidden_states, residual, ...): dense(context) + residual
        return (_get(self.module, self.SA), 1) if stage == "heads" else super().residual_input(stage)

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        return (self.module.post_attention_layernorm, 0)  # the attention output, residual included


class _HFFalconBlock(_QueryHeadUnits, _HFBlock):
    """Falcon (``FalconDecoderLayer``): the fused ``self_attention.query_key_value``, ``self_attention.dense``,
    ``mlp.dense_h_to_4h / dense_4h_to_h``, pre-LN. Attention and FFN run in parallel (the new decoder architecture of
    Falcon-40B/180B, or ``parallel_attn`` as in Falcon-7B) or one after the other. The fused projection holds, by
    layout: key/value groups, each its query heads then its key and value head (new architecture; a unit is a
    group, or with ``head_unit="query"`` a query head, as many kept in every group: see :class:`_QueryHeadUnits`);
    all query heads then one shared key and value head (``multi_query``; a unit is a query head, the shared
    rows stay); or query, key and value head by head (a unit is a head). Falcon-RW's ALiBi slopes are built for all
    heads and folded into the attention mask as well: its heads are refused by the head-layout check."""

    kind = "hf_falcon"
    SA, QKV, OUT = "self_attention", ("query_key_value",), "self_attention.dense"
    UP, DOWN = "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    RESID_FFN = ("mlp", 0)  # what the layout is recognised by; residual_input says where the residual is read
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", None
    PLAIN = frozenset({"attention_dropout", "rotary_emb"})

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        flags = ("new_decoder_architecture", "multi_query")
        return (all(isinstance(getattr(sa, f, None), bool) for f in flags)
                and isinstance(getattr(getattr(module, "config", None), "parallel_attn", None), bool)
                and isinstance(getattr(sa, "num_kv_heads", None), int) and super().matches(module))

    def _parallel(self) -> bool:
        return bool(self.module.config.new_decoder_architecture or self.module.config.parallel_attn)

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | str | None:
        if self._parallel():
            return BLOCK_OUTPUT
        # one after the other: x + attn(ln(x)) enters post_attention_layernorm, then the FFN's sum
        return (self.module.post_attention_layernorm, 0) if stage == "ffn" else None

    @property
    def _grouped(self) -> bool:
        return bool(_get(self.module, self.SA).new_decoder_architecture)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head in the new architecture's groups (1 otherwise: a unit is a head)."""
        return self.num_heads // int(_get(self.module, self.SA).num_kv_heads) if self._grouped else 1

    @property
    def QUERY_HEADS_OK(self) -> bool:  # noqa: N802 - the class attribute of the other blocks
        return self._grouped

    def prepare_heads(self) -> None:
        super().prepare_heads()
        self._mark_head_units()

    def qkv_weights(self) -> list[torch.Tensor]:
        sa = _get(self.module, self.SA)
        w = sa.query_key_value.weight
        if self.query_heads:  # each group's query rows, group by group (its key and value rows stay)
            per = self.kv_groups
            return [w.view(int(sa.num_kv_heads), per + 2, self.head_dim, -1)[:, :per].reshape(-1, w.shape[-1])]
        # multi-query: the shared key and value rows belong to no head
        return [w[:self.num_heads * self.head_dim]] if sa.multi_query and not self._grouped else [w]

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        keep = _index_to(keep, self.out_proj.weight)
        d, n, kept = self.head_dim, self.num_heads, int(keep.numel())
        if self.query_heads:  # query heads, as many in every group: their rows, every key and value head's
            n_kv, per = int(sa.num_kv_heads), self.kv_groups
            heads = _balanced_query_heads(self, keep, n_kv)
            groups = torch.arange(n_kv, device=keep.device) * (per + 2)
            slots = torch.cat([heads // per * (per + 2) + heads % per, groups + per, groups + per + 1])
            rows, cols = _head_rows(torch.sort(slots).values, d), _head_rows(heads, d)
            sa.num_heads = kept
        elif self._grouped:  # per group: its query heads, then its key and value heads
            per = self.kv_groups
            rows, cols = _head_rows(keep, (per + 2) * d), _head_rows(keep, per * d)
            sa.num_kv_heads, sa.num_heads = kept, kept * per
        elif sa.multi_query:
            cols = _head_rows(keep, d)
            rows = _multi_query_rows(cols, n, d)
            sa.num_heads = kept
        else:  # query, key and value head by head
            rows, cols = _head_rows(keep, 3 * d), _head_rows(keep, d)
            sa.num_heads = sa.num_kv_heads = kept
        self._cut_attention((rows,), cols, out_weight, out_bias)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "num_key_value_heads": int(_get(self.module, self.SA).num_kv_heads)}


class _HFGPTBigCodeBlock(_HFBlock):
    """GPTBigCode: StarCoder and SantaCoder (``GPTBigCodeBlock``): the fused ``attn.c_attn`` (multi-query: every
    query head, then one key and one value head that stay, a unit being a query head; else query, key and value
    head by head), ``attn.c_proj``, ``mlp.c_fc / c_proj``, ``ln_1 / ln_2``, pre-LN. The attention splits its fused
    output by ``embed_dim`` (its query width), which follows the heads with ``num_heads`` and
    ``num_key_value_groups``."""

    kind = "hf_gpt_bigcode"
    SA, QKV, OUT = "attn", ("c_attn",), "attn.c_proj"
    UP, DOWN = "mlp.c_fc", "mlp.c_proj"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    RESID_FFN = ("ln_2", 0)  # x + mlp(ln_2(x))
    N_HEADS, HEAD_SIZE, ALL_HEADS = "num_heads", "head_dim", "embed_dim"
    PLAIN = frozenset({"attn_dropout", "resid_dropout"})

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        sa = _get(module, cls.SA)
        return (isinstance(getattr(sa, "multi_query", None), bool) and isinstance(getattr(sa, "kv_heads", None), int)
                and not getattr(sa, "is_cross_attention", False) and super().matches(module))

    def qkv_weights(self) -> list[torch.Tensor]:
        sa = _get(self.module, self.SA)
        w = sa.c_attn.weight
        # multi-query: the shared key and value rows belong to no head
        return [w[:self.num_heads * self.head_dim]] if sa.multi_query else [w]

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        keep = _index_to(keep, self.out_proj.weight)
        d, n, kept = self.head_dim, self.num_heads, int(keep.numel())
        cols = _head_rows(keep, d)
        if sa.multi_query:
            rows = _multi_query_rows(cols, n, d)
        else:  # query, key and value head by head
            rows = _head_rows(keep, 3 * d)
            sa.kv_heads, sa.kv_dim = kept, kept * d
        self._cut_attention((rows,), cols, out_weight, out_bias)
        sa.num_heads, sa.embed_dim = kept, kept * d
        if hasattr(sa, "num_key_value_groups"):  # the query heads per key/value head the attention kernel repeats
            sa.num_key_value_groups = kept // int(sa.kv_heads)


class _HFMptBlock(_PerHeadBias):
    """MPT (``MptBlock``): ``attn.Wqkv`` (query, key and value as three blocks), ``attn.out_proj``, ``ffn.up_proj /
    down_proj``, ``norm_1 / norm_2``, pre-LN; the MLP adds its residual itself (``ffn(x, residual)``). The ALiBi
    bias the model builds for all its heads, ``(heads, 1, keys)``, reaches a layer that lost heads sliced to its
    own."""

    kind = "hf_mpt"
    SA, QKV, OUT = "attn", ("Wqkv",), "attn.out_proj"
    UP, DOWN = "ffn.up_proj", "ffn.down_proj"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    RESID_FFN = ("ffn", 1)  # MptMLP.forward(hidden_states, residual): down_proj(...) + residual
    N_HEADS, HEAD_SIZE, ALL_HEADS = "n_heads", "head_dim", None
    HEAD_BIAS = ("position_bias", 0)

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        return (self.module.norm_2, 0)  # the attention output, residual included

    def qkv_weights(self) -> list[torch.Tensor]:
        return _three_blocks(_get(self.module, self.SA).Wqkv.weight)

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        keep = _index_to(keep, self.out_proj.weight)
        rows, n_before = _head_rows(keep, self.head_dim), self.num_heads
        self._cut_attention((_three_block_rows(rows, n_before * self.head_dim),), rows, out_weight, out_bias)
        sa.n_heads = int(keep.numel())
        self._keep_bias_channels(keep, n_before)


class _HFT5Block(_HFBlock):
    """T5, T5 v1.1, Flan-T5, mT5 and UMT5-style blocks (``T5Block``): ``layer[0].SelfAttention.{q,k,v,o}``, an
    FFN ``layer[-1].DenseReluDense`` (``wi -> act -> wo``, or gated: ``act(wi_0(x)) * wi_1(x) -> wo``), RMS norms
    before each sublayer (pre-LN), and in a decoder block the cross-attention ``layer[1].EncDecAttention``
    (:class:`_HFT5CrossAttention`). The relative position bias is computed by the first block and handed to the
    others, so each block is replayed with its own captured arguments (``per_block_context``).

    Heads (transformers >= 5): that bias has one channel per head of every block, and each block hands it on. An
    attention that lost heads keeps the original indices of its heads in the buffer ``kept_heads`` and, with hooks,
    uses their channels of the bias it is handed (or computes, in the first block: the relative-position table
    keeps every head's column and its output is sliced) and hands on the whole bias, as the unpruned attention
    does. UMT5, whose every block computes its own bias, keeps its kept heads' columns of the table."""

    kind = "hf_t5"
    SA, QKV, OUT = "layer.0.SelfAttention", ("q", "k", "v"), "layer.0.SelfAttention.o"
    NORM_HEADS = NORM_FFN = "-"  # pre-LN
    N_HEADS, HEAD_SIZE, ALL_HEADS = "n_heads", "key_value_proj_dim", "inner_dim"
    PLAIN = frozenset({"dropout", "relative_attention_bias"})
    per_block_context = True

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.GATE, self.UP, self.DOWN, self.RESID_FFN = self._ffn_paths(module)

    @staticmethod
    def _ffn_paths(module: nn.Module) -> tuple[str | None, str, str, tuple[str, int]]:
        ff = f"layer.{len(module.layer) - 1}"
        gated = isinstance(_get(module, ff + ".DenseReluDense.wi_0"), nn.Linear)
        up = ff + (".DenseReluDense.wi_1" if gated else ".DenseReluDense.wi")
        return (ff + ".DenseReluDense.wi_0" if gated else None), up, ff + ".DenseReluDense.wo", (ff + ".layer_norm", 0)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        layers = getattr(module, "layer", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
            return False
        gate, up, down, (norm, _) = cls._ffn_paths(module)
        sa = _get(module, cls.SA)
        return (sa is not None and all(isinstance(getattr(sa, n, None), nn.Linear) for n in (*cls.QKV, "o"))
                and all(isinstance(_get(module, p), nn.Linear) for p in (up, down) + ((gate,) if gate else ()))
                and _get(module, norm) is not None and hasattr(sa, cls.N_HEADS) and hasattr(sa, cls.HEAD_SIZE))

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        # a decoder block's cross-attention comes between: x + attn(.) enters layer[1]'s norm
        if len(self.module.layer) == 3:
            return (self.module.layer[1].layer_norm, 0)
        return super().heads_sum_input()

    def prepare_heads(self) -> None:
        from packaging.version import Version  # a dependency of transformers

        version = _transformers_version()
        if Version(version) < Version("5"):
            raise ValueError(f"block {self.name!r}: T5 attentions in transformers {version} return the position bias "
                             "in another place than the release this adapter reads; upgrade transformers to >= 5 "
                             "to prune T5 heads, or prune target='ffn' on this model.")
        super().prepare_heads()

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        sa = _get(self.module, self.SA)
        n_before = self.num_heads
        super().shrink_heads(keep, out_weight, out_bias)
        held = getattr(sa, "kept_heads", None)
        if held is None and keep.numel() == n_before:
            return  # every head kept: the attention stays as it was
        keep = _index_to(keep, self.out_proj.weight).long()
        kept = keep.clone() if held is None else held[keep]
        table = getattr(sa, "relative_attention_bias", None)
        if "position_bias" not in inspect.signature(type(sa).forward).parameters:
            # UMT5: every block computes its own bias from its table, which keeps its kept heads' columns
            if table is not None:
                sa.relative_attention_bias = nn.Embedding.from_pretrained(
                    table.weight.detach()[:, keep].clone(), freeze=not table.weight.requires_grad)
            return
        sa.register_buffer("kept_heads", kept)
        if held is None:
            sa.original_n_heads = n_before
            sa.register_forward_pre_hook(_t5_bias_in, with_kwargs=True)
            sa.register_forward_hook(_t5_bias_out, with_kwargs=True)
        if table is not None and getattr(sa, "has_relative_attention_bias", False):
            table.register_buffer("kept_heads", kept.clone())
            if not any(h is _t5_bias_table for h in table._forward_hooks.values()):
                table.register_forward_hook(_t5_bias_table)

    @property
    def cross(self) -> _HFT5CrossAttention | None:  # type: ignore[override]
        """A decoder block's cross-attention (``layer[1].EncDecAttention``), or ``None``."""
        if len(self.module.layer) != 3:
            return None
        view = _HFT5CrossAttention(self.name, self.module)
        sa = _get(self.module, view.SA)
        if sa is None or not all(isinstance(getattr(sa, n, None), nn.Linear) for n in (*view.QKV, "o")):
            return None
        return view



class _HFT5CrossAttention(_HFT5Block):
    """The cross-attention of a T5 decoder block (``layer[1].EncDecAttention``), seen as a block whose heads are its
    heads (the "cross" stage): pre-LN, ``x + EncDecAttention(layer[1].layer_norm(x), encoder states)``, the sum
    entering the FFN's norm. Its position bias (zeros: no relative positions across the two sequences) is handed on
    like the self-attention's."""

    kind = "hf_t5 (cross-attention)"
    SA, OUT = "layer.1.EncDecAttention", "layer.1.EncDecAttention.o"

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | None:
        if stage == "ffn":
            return super().residual_input(stage)
        return (self.module.layer[1].layer_norm, 0)

    def heads_sum_input(self) -> tuple[nn.Module, int] | None:
        return (_get(self.module, self.RESID_FFN[0]), 0)

    @property
    def cross(self) -> None:  # type: ignore[override]
        return None


def _t5_bias_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook of a T5 attention that lost heads: keep the position bias it is handed (every original
    head's channels) for :func:`_t5_bias_out`, and pass its kept heads' channels on."""
    at = _position(module, "position_bias")
    by_name = "position_bias" in kwargs
    value = kwargs.get("position_bias") if by_name else (args[at] if at is not None and len(args) > at else None)
    module.full_bias = value
    if value is None:
        return args, kwargs
    value = value.index_select(1, module.kept_heads.to(value.device))
    if by_name:
        return args, {**kwargs, "position_bias": value}
    return (*args[:at], value, *args[at + 1:]), kwargs


def _t5_bias_out(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook of a T5 attention that lost heads: hand on the position bias of every original head, as the
    unpruned attention does (the bias it was handed, the one its relative-position table computed, or zeros)."""
    full, module.full_bias = module.full_bias, None
    if full is None:
        table = getattr(module, "relative_attention_bias", None)
        values = getattr(table, "full_values", None)
        if values is not None and getattr(module, "has_relative_attention_bias", False):
            table.full_values = None
            full = values.permute(2, 0, 1).unsqueeze(0)
        else:  # an attention without relative positions computes zeros
            got = output[1]
            full = got.new_zeros((got.shape[0], module.original_n_heads, *got.shape[2:]))
    return (output[0], full, *output[2:])


def _t5_bias_table(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the relative-position table of a T5 attention that lost heads: keep every head's values for
    :func:`_t5_bias_out`, and give the attention its kept heads' (the last axis)."""
    module.full_values = output
    return output.index_select(-1, module.kept_heads.to(output.device))


class _TorchEncoderBlock(_Block):
    kind = "torch_encoder_layer"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.TransformerEncoderLayer)

    def post_norm(self, stage: str) -> nn.LayerNorm | None:
        if self.module.norm_first:
            return None
        norm = self.module.norm2 if stage == "ffn" else self.module.norm1
        return norm if isinstance(norm, nn.LayerNorm) else None

    def residual_input(self, stage: str) -> tuple[nn.Module, int] | None:
        if stage != "ffn":
            return None
        # post-LN: norm2(x + ff(x)), the FFN input is the residual; pre-LN: x + ff(norm2(x))
        return (self.module.norm2, 0) if self.module.norm_first else (self.module.linear1, 0)

    def batch_first(self, stage: str = "block") -> bool:
        # PrunedMultiheadAttention works internally in (batch, tokens, features) whatever the layer layout.
        return True if stage == "heads" else bool(self.module.self_attn.batch_first)

    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        # The explicit slow path of nn.TransformerEncoderLayer.forward (Fig. 1 of Xiong et al. 2020), so that
        # forward hooks on linear2 and out_proj fire (the fused fast path bypasses submodule calls).
        layer = self.module
        kw = ctx["kwargs"]
        src_mask = kw.get("src_mask")
        kpm = kw.get("src_key_padding_mask")
        causal = bool(kw.get("is_causal", False))
        if kpm is not None:
            kpm = F._canonical_mask(mask=kpm, mask_name="src_key_padding_mask",
                                    other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                    target_type=x.dtype)
        if src_mask is not None:
            src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                         target_type=x.dtype, check_other=False)
        if layer.norm_first:
            x = x + layer._sa_block(layer.norm1(x), src_mask, kpm, is_causal=causal)
            x = x + layer._ff_block(layer.norm2(x))
        else:
            x = layer.norm1(x + layer._sa_block(x, src_mask, kpm, is_causal=causal))
            x = layer.norm2(x + layer._ff_block(x))
        return x

    @property
    def up(self) -> nn.Linear:
        return self.module.linear1

    @property
    def down(self) -> nn.Linear:
        return self.module.linear2

    def set_ffn(self, producers: list[nn.Linear], down: nn.Linear) -> None:
        (up,) = producers
        self.module.linear1 = up
        self.module.linear2 = down

    @property
    def num_heads(self) -> int:
        return int(self.module.self_attn.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.module.self_attn.head_dim)

    def prepare_heads(self) -> None:
        if not isinstance(self.module.self_attn, PrunedMultiheadAttention):
            self.module.self_attn = PrunedMultiheadAttention.from_multihead_attention(self.module.self_attn)

    def unprepare_heads(self) -> None:
        att = self.module.self_attn
        if (not isinstance(att, PrunedMultiheadAttention) or att.inner_dim != att.embed_dim
                or (att.in_proj_bias is None) != (att.out_proj.bias is None)):
            return  # heads were removed (or the biases differ): nn.MultiheadAttention cannot express it
        mha = _uninitialised(lambda: nn.MultiheadAttention(att.embed_dim, att.num_heads, dropout=att.dropout,
                                                           bias=att.in_proj_bias is not None,
                                                           batch_first=att.batch_first),
                             att.in_proj_weight)
        with torch.no_grad():
            mha.in_proj_weight.copy_(att.in_proj_weight)
            mha.out_proj.weight.copy_(att.out_proj.weight)
            if att.in_proj_bias is not None:
                mha.in_proj_bias.copy_(att.in_proj_bias)
                mha.out_proj.bias.copy_(att.out_proj.bias)
        mha.train(att.training)
        mha.out_proj.train(att.out_proj.training)
        _same_grad_flags(mha, att)
        _same_hooks(mha.out_proj, att.out_proj)
        self.module.self_attn = mha

    @property
    def out_proj(self) -> nn.Linear:
        return self.module.self_attn.out_proj

    def qkv_weights(self) -> list[torch.Tensor]:
        return list(self.module.self_attn.in_proj_weight.chunk(3))

    def shrink_heads(self, keep: torch.Tensor, out_weight: torch.Tensor | None = None,
                     out_bias: torch.Tensor | None = None) -> None:
        self.prepare_heads()
        att = self.module.self_attn
        d = att.head_dim
        rows = _head_rows(_index_to(keep, att.in_proj_weight), d)
        inner = att.inner_dim
        all_rows = torch.cat([rows, rows + inner, rows + 2 * inner])
        new = _uninitialised(lambda: PrunedMultiheadAttention(att.embed_dim, int(keep.numel()), d,
                                                              bias=att.in_proj_bias is not None,
                                                              batch_first=att.batch_first, dropout=att.dropout,
                                                              out_bias=att.out_proj.bias is not None),
                             att.in_proj_weight)
        with torch.no_grad():
            new.in_proj_weight.copy_(att.in_proj_weight[all_rows])
            if new.in_proj_bias is not None:
                new.in_proj_bias.copy_(att.in_proj_bias[all_rows])
        out = att.out_proj
        w = out.weight[:, rows] if out_weight is None else out_weight
        b = out.bias if out_weight is None else out_bias
        new.out_proj = _linear_like(out, w, b)
        keep = _index_to(keep, att.in_proj_weight).long()
        held = att.kept_heads if att.kept_heads is not None else torch.arange(att.num_heads, device=keep.device)
        new.original_num_heads = att.original_num_heads
        new.kept_heads = held[keep].clone()
        new.train(att.training)
        _same_grad_flags(new, att)
        self.module.self_attn = new

    def spec(self) -> dict[str, Any]:
        # what the weights' shapes do not show but the outputs depend on, checked by apply_spec
        act = {1: "relu", 2: "gelu"}.get(getattr(self.module, "activation_relu_or_gelu", 0), "other")
        return {**super().spec(), "norm_first": bool(self.module.norm_first),
                "batch_first": bool(self.module.self_attn.batch_first), "activation": act}

    def set_sizes(self, intermediate_size: int, num_heads: int) -> None:
        self.shrink_ffn(torch.arange(intermediate_size))
        if num_heads != self.num_heads or isinstance(self.module.self_attn, PrunedMultiheadAttention):
            self.shrink_heads(torch.arange(num_heads))


_BLOCK_KINDS: tuple[type[_Block], ...] = (
    _HFBertBlock, _HFAlbertBlock, _HFFNetBlock, _HFDebertaBlock, _HFDebertaV2Block, _HFLongformerBlock, _HFMPNetBlock,
    _HFDistilBertBlock, _HFBeitBlock, _HFSamVisionBlock, _HFVitDetBlock, _HFSegformerBlock, _HFPvtBlock, _HFPvtV2Block,
    _HFSwinBlock, _HFSwinv2Block, _HFSwinLegacyBlock, _HFViTBlock, _HFBeitLegacyBlock, _HFViTLegacyBlock,
    _HFDinov2Block, _HFDinov2LegacyBlock, _HFDinov3GatedBlock, _HFDinov3Block, _HFCLIPBlock, _HFModernBertBlock,
    _HFModernBertDecoderBlock, _HFOPTBlock, _HFBartBlock, _HFWav2Vec2Block, _HFGPT2Block, _HFStarcoder2Block,
    _HFStableLmBlock, _HFVaultGemmaBlock, _HFCohereBlock, _HFCohere2MoEBlock, _HFGlm4Block, _HFGemma4MoEBlock,
    _HFGemma4Block, _HFAfmoeBlock, _HFAfmoeMoEBlock, _HFKolibri1Block, _HFGemma2Block, _HFOlmo2Block, _HFPhi3Block,
    _HFGlmBlock, _HFLfm3Block, _HFLfm3ConvBlock, _HFLfm2Block, _HFLfm2ConvBlock, _HFGraniteHybridMoEBlock,
    _HFGraniteHybridMambaMoEBlock, _HFGraniteHybridBlock, _HFGraniteHybridMambaBlock, _HFLinearAttentionBlock,
    _HFRecurrentGemmaRecurrentBlock, _HFRecurrentGemmaBlock, _HFLinearAttentionMoEBlock, _HFMiniMaxLightningBlock,
    _HFMiniMaxBlock, _HFDeltaAttentionBlock, _HFDeltaAttentionMoEBlock, _HFJambaBlock, _HFJambaMoEBlock,
    _HFFalconH1Block, _HFJambaMambaBlock, _HFJambaMambaMoEBlock, _HFNemotronHAttentionBlock, _HFNemotronHMLPBlock,
    _HFNemotronHMoEBlock, _HFHyperCLOVAXBlock, _HFLlama4Block, _HFLlama4MoEBlock, _HFAriaMoEBlock, _HFGteBlock,
    _HFJinaV3Block, _HFEsmcBlock, _HFAimv2Block, _HFPixtralBlock, _HFLlamaBlock, _HFMoEBlock, _HFGptOssBlock,
    _HFDbrxBlock, _HFGraniteMoEBlock, _HFMLABlock, _HFMLAMoEBlock, _HFLlamaPlainBlock, _HFApertusBlock,
    _HFNanoChatBlock, _HFPhiBlock, _HFGPTJBlock, _HFCodeGenBlock, _HFGPTNeoBlock, _HFGPTNeoXBlock,
    _HFGPTNeoXJapaneseBlock, _HFPersimmonBlock, _HFBloomBlock, _HFFalconBlock, _HFGPTBigCodeBlock, _HFMptBlock,
    _HFT5Block, _TorchEncoderBlock,
)


#: Parts of a layer that make it none of the known layouts, whatever else it has: Gemma 3n's AltUp (``altup``)
#: carries several residual streams through the layer at once, stacked in its hidden states.
_NOT_A_BLOCK = ("altup",)


def find_blocks(model: nn.Module) -> list[_Block]:
    """Transformer blocks of ``model`` in registration order (blocks nested in a block are not searched)."""
    blocks: list[_Block] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if any(isinstance(getattr(module, part, None), nn.Module) for part in _NOT_A_BLOCK):
            continue
        for kind in _BLOCK_KINDS:
            if kind.matches(module):
                blocks.append(kind(name, module))
                taken.append(name)
                break
    return blocks


def disable_nested_fast_path(model: nn.Module, like: nn.Module | None = None) -> None:
    """Stop nn.TransformerEncoder from converting inputs to nested tensors (needs an unpruned attention).

    With ``like`` (the unpruned model), an encoder whose attention modules are all unpruned again gets back the
    setting of the encoder of the same name in ``like``.
    """
    before = {n: m.use_nested_tensor for n, m in (like.named_modules() if like is not None else ())
              if isinstance(m, nn.TransformerEncoder)}
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder):
            if any(isinstance(layer.self_attn, PrunedMultiheadAttention) for layer in m.layers):
                m.use_nested_tensor = False
            elif name in before:
                m.use_nested_tensor = before[name]


class _StopCapture(Exception):
    """Raised by a capture hook once every wanted input is recorded (the rest of the forward is not needed)."""


def capture_inputs(modules: dict[str, nn.Module | tuple[nn.Module, int]], run: Callable[[], torch.Tensor], *,
                   stop: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Run ``run()`` while recording the input of each module (hooks always removed).

    ``modules`` maps names to a module (its first positional input is recorded) or to ``(module, index)``.
    Several calls of one module in one run (chunked feed-forward) are concatenated along the sequence axis.
    ``stop=True`` abandons the forward as soon as every module has been called once (the output is then ``None``);
    use it only when each module is called once per run.
    """
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = []
    out = None
    try:
        for key, entry in modules.items():
            mod, pos = entry if isinstance(entry, tuple) else (entry, 0)

            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _key: str = key,
                     _pos: int = pos) -> None:
                if not args:  # the first input passed by name
                    args = leading_input(_m, args, kwargs)[0]
                seen[_key].append(args[_pos].detach())
                if stop and all(seen.values()):
                    raise _StopCapture

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        out = run()
    except _StopCapture:
        pass
    finally:
        for h in handles:
            h.remove()
    got = {}
    for key, parts in seen.items():
        if not parts:
            raise RuntimeError(f"module {key!r} was not called by the block forward; its structure is not supported")
        got[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return out, got
