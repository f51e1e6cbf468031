"""``Int8MultiheadAttention``: ``nn.MultiheadAttention`` with int8 projections.

``nn.MultiheadAttention`` never calls its projections as modules (``F.multi_head_attention_forward``
reads ``in_proj_weight`` and ``out_proj.weight`` directly), so swapping ``out_proj`` for an
``Int8Linear`` changes nothing. This module computes the input and output projections with
``Int8Linear`` layers and the attention itself (scores, softmax, weighted sum) in floating point,
with :func:`torch.nn.functional.scaled_dot_product_attention` unless the attention weights are
requested.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

import pycompress.ops as ops
from pycompress._utils import check_int8_bits
from pycompress.nn._common import linear_from_weight
from pycompress.nn.int8_linear import Int8Linear

__all__ = ["Int8MultiheadAttention", "mha_unsupported_reason"]

_MODES = ("w8a8", "w8a16")


def mha_unsupported_reason(mha: nn.Module) -> str | None:
    """None when :meth:`Int8MultiheadAttention.from_float` can convert ``mha``, else why not."""
    if not isinstance(mha, nn.MultiheadAttention):
        return f"not an nn.MultiheadAttention ({type(mha).__name__})"
    if type(mha) is not nn.MultiheadAttention:
        return f"{type(mha).__name__} is a subclass of nn.MultiheadAttention with its own behaviour"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported by Int8MultiheadAttention"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported by Int8MultiheadAttention"
    weights = [mha.in_proj_weight] if mha._qkv_same_embed_dim else [mha.q_proj_weight, mha.k_proj_weight,
                                                                     mha.v_proj_weight]
    for w in weights + [mha.out_proj.weight]:
        if w is None or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"weight dtype {None if w is None else w.dtype} is not a floating type supported by Int8Linear"
    return None


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = not attended) as an additive float mask; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class Int8MultiheadAttention(nn.Module):
    """Multi-head attention with int8 input and output projections (``Int8Linear``).

    A drop-in replacement for ``nn.MultiheadAttention`` (same ``forward`` signature and results:
    ``batch_first`` both ways, unbatched inputs, ``key_padding_mask`` / ``attn_mask`` as bool or
    float masks, ``is_causal``, ``need_weights`` / ``average_attn_weights``, attention dropout in
    training). The projections are ``Int8Linear`` layers of the same ``mode`` / ``act_bits`` /
    ``weight_bits``; scores, softmax and the weighted sum of the values run in the input's
    floating dtype.

    Layout: when ``kdim == vdim == embed_dim`` (the float module's packed ``in_proj_weight``), the
    input projection is one ``Int8Linear`` ``in_proj`` of shape ``[3 * embed_dim, embed_dim]``,
    computed in one call for self-attention (``query is key is value``); cross-attention calls
    multiply by its row blocks. Otherwise there are three layers ``q_proj`` / ``k_proj`` /
    ``v_proj``. ``out_proj`` is an ``Int8Linear``. All tensors are plain buffers of these layers.

    Not supported (``from_float`` raises, ``quantize`` leaves such a module in floating point):
    ``add_bias_kv=True`` and ``add_zero_attn=True``.

    Example:
        >>> import torch
        >>> from pycompress.nn import Int8MultiheadAttention
        >>> mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
        >>> q = Int8MultiheadAttention.from_float(mha).eval()
        >>> x = torch.randn(2, 10, 64)
        >>> ref, _ = mha(x, x, x)
        >>> out, _ = q(x, x, x)
        >>> bool(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99)
        True
    """

    # nn.TransformerEncoderLayer takes its fused fast path (which reads float packed projection
    # weights) only when these describe a float packed attention; with these values it calls this
    # module's forward. They are None / False here because this module has no float projections.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        mode: str = "w8a8",
        act_bits: int = 8,
        weight_bits: int = 8,
        device=None,
    ) -> None:
        super().__init__()
        for n, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for n, v in (("kdim", kdim), ("vdim", vdim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be a positive int or None, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        check_int8_bits("act_bits", act_bits, mode)
        check_int8_bits("weight_bits", weight_bits, mode)
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = int(kdim)
        self.vdim = int(vdim)
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.mode = mode
        self.act_bits = int(act_bits)
        self.weight_bits = int(weight_bits)
        self.packed_in_proj = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        opts = dict(bias=bias, mode=mode, device=device, act_bits=act_bits, weight_bits=weight_bits)
        if self.packed_in_proj:
            self.in_proj = Int8Linear(embed_dim, 3 * embed_dim, **opts)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.in_proj = None
            self.q_proj = Int8Linear(embed_dim, embed_dim, **opts)
            self.k_proj = Int8Linear(self.kdim, embed_dim, **opts)
            self.v_proj = Int8Linear(self.vdim, embed_dim, **opts)
        self.out_proj = Int8Linear(embed_dim, embed_dim, **opts)

    # ------------------------------------------------------------------ construction

    @classmethod
    @torch.no_grad()
    def from_float(cls, mha: nn.MultiheadAttention, mode: str = "w8a8", act_bits: int = 8,
                   weight_bits: int = 8) -> "Int8MultiheadAttention":
        """Quantizes the projections of ``mha`` like :meth:`Int8Linear.from_float` (per output
        channel of each projection; the packed ``in_proj_weight`` has one scale per row)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_float expects an nn.MultiheadAttention, got {type(mha).__name__}")
        reason = mha_unsupported_reason(mha)
        if reason is not None:
            raise ValueError(f"from_float: {reason}")
        bias = mha.in_proj_bias is not None
        dev = mha.out_proj.weight.device
        m = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=bias, kdim=mha.kdim, vdim=mha.vdim,
                batch_first=mha.batch_first, mode=mode, act_bits=act_bits, weight_bits=weight_bits, device=dev)
        opts = dict(mode=mode, act_bits=act_bits, weight_bits=weight_bits)
        in_bias = mha.in_proj_bias.detach().float() if bias else None
        if m.packed_in_proj:
            m.in_proj = Int8Linear.from_float(linear_from_weight(mha.in_proj_weight.detach().float(), in_bias), **opts)
        else:
            biases = in_bias.chunk(3) if bias else (None, None, None)
            for name, w, b in zip(("q_proj", "k_proj", "v_proj"),
                                  (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), biases):
                setattr(m, name, Int8Linear.from_float(linear_from_weight(w.detach().float(), b), **opts))
        m.out_proj = Int8Linear.from_float(mha.out_proj, **opts)
        m.train(mha.training)
        return m

    def config(self) -> dict:
        """JSON-serializable description from which :meth:`from_config` rebuilds the layer."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "bias": self.out_proj.bias is not None,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
            "mode": self.mode,
            "act_bits": self.act_bits,
            "weight_bits": self.weight_bits,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "Int8MultiheadAttention":
        """Builds a layer with buffers of the right shapes (values to be loaded with ``load_state_dict``)."""
        return cls(cfg["embed_dim"], cfg["num_heads"], dropout=cfg.get("dropout", 0.0), bias=cfg.get("bias", True),
                   kdim=cfg.get("kdim"), vdim=cfg.get("vdim"), batch_first=cfg.get("batch_first", False),
                   mode=cfg.get("mode", "w8a8"), act_bits=cfg.get("act_bits", 8),
                   weight_bits=cfg.get("weight_bits", 8))

    @torch.no_grad()
    def to_float(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (fp32, dequantized weights, same device)."""
        dev = self.out_proj.weight.device
        bias = self.out_proj.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=bias,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=dev)
        if self.packed_in_proj:
            lin = self.in_proj.to_float()
            mha.in_proj_weight.copy_(lin.weight)
            if bias:
                mha.in_proj_bias.copy_(lin.bias)
        else:
            lins = [p.to_float() for p in (self.q_proj, self.k_proj, self.v_proj)]
            for dst, lin in zip((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), lins):
                dst.copy_(lin.weight)
            if bias:
                mha.in_proj_bias.copy_(torch.cat([lin.bias for lin in lins]))
        out = self.out_proj.to_float()
        mha.out_proj.weight.copy_(out.weight)
        if bias:
            mha.out_proj.bias.copy_(out.bias)
        mha.train(self.training)
        return mha

    # ------------------------------------------------------------------ forward

    def _rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``x`` times the rows ``start:stop`` of the packed input projection."""
        p = self.in_proj
        if type(p) is not Int8Linear:  # swapped for a float or export layer (export_onnx): slice its output
            return p(x)[..., start:stop]
        bias = None if p.bias is None else p.bias[start:stop]
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.mode == "w8a16":
            return ops.int8_linear_w8a16(x, p.weight[start:stop], p.weight_scale[start:stop], bias)
        return ops.int8_linear(x, p.weight[start:stop], p.weight_scale[start:stop], bias, act_bits=self.act_bits)

    def _project(self, query, key, value):
        if not self.packed_in_proj:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        q = self._rows(query, 0, e)
        if key is value:
            k, v = self._rows(key, e, 3 * e).chunk(2, dim=-1)
        else:
            k, v = self._rows(key, e, 2 * e), self._rows(value, 2 * e, 3 * e)
        return q, k, v

    def _check(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validates the inputs like nn.MultiheadAttention (clear errors); True when batched."""
        for n, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Int8MultiheadAttention: {n} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(f"Int8MultiheadAttention: nested tensors are not supported ({n})")
            if not t.is_floating_point():
                raise TypeError(f"Int8MultiheadAttention: {n} must be a floating tensor, got {t.dtype}")
        if query.dim() not in (2, 3):
            raise ValueError(f"Int8MultiheadAttention: query must be 2-D (unbatched) or 3-D (batched), got "
                             f"{query.dim()}-D of shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"Int8MultiheadAttention: key and value must be {query.dim()}-D like query, got "
                             f"{key.dim()}-D and {value.dim()}-D")
        for n, t, want in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != want:
                raise ValueError(f"Int8MultiheadAttention: {n} has {t.shape[-1]} features in its last dimension, "
                                 f"expected {want}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"Int8MultiheadAttention: key {tuple(key.shape)} and value {tuple(value.shape)} must "
                             "have the same sequence and batch dimensions")
        bdim, sdim = (0, 1) if self.batch_first else (1, 0)
        if batched and query.shape[bdim] != key.shape[bdim]:
            raise ValueError(f"Int8MultiheadAttention: query has batch size {query.shape[bdim]} but key has "
                             f"{key.shape[bdim]} (batch_first={self.batch_first})")
        bsz = query.shape[bdim] if batched else 1
        tgt = query.shape[sdim] if batched else query.shape[0]
        src = key.shape[sdim] if batched else key.shape[0]
        for n, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"Int8MultiheadAttention: {n} must be a torch.Tensor or None, got {type(m).__name__}")
            if m.dtype != torch.bool and not m.is_floating_point():
                raise TypeError(f"Int8MultiheadAttention: {n} must be a bool or floating tensor, got {m.dtype}")
        if key_padding_mask is not None:
            want = (bsz, src) if batched else (src,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"Int8MultiheadAttention: key_padding_mask must have shape {want}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            wants = [(tgt, src), (bsz * self.num_heads, tgt, src)]
            if tuple(attn_mask.shape) not in wants:
                raise ValueError(f"Int8MultiheadAttention: attn_mask must have shape {wants[0]} or {wants[1]}, "
                                 f"got {tuple(attn_mask.shape)}")
        return batched

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
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError("Int8MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask; "
                             "pass attn_mask as well (nn.Transformer.generate_square_subsequent_mask)")
        dtype = query.dtype
        kpm = _additive_mask(key_padding_mask, dtype)
        # is_causal lets scaled_dot_product_attention build the mask itself; with a padding mask or
        # explicit weights the given attn_mask is used, as in nn.MultiheadAttention
        causal = bool(is_causal) and kpm is None and not need_weights
        mask = None if causal else _additive_mask(attn_mask, dtype)

        q, k, v = self._project(query, key, value)  # per token: any layout
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            kpm = None if kpm is None else kpm.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        bsz, tgt, _ = q.shape
        src = k.shape[1]
        h, d = self.num_heads, self.head_dim
        q = q.reshape(bsz, tgt, h, d).transpose(1, 2)
        k = k.reshape(bsz, src, h, d).transpose(1, 2)
        v = v.reshape(bsz, src, h, d).transpose(1, 2)
        if mask is not None:
            mask = mask.view(1, 1, tgt, src) if mask.dim() == 2 else mask.view(bsz, h, tgt, src)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self.packed_in_proj:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s + f", batch_first={self.batch_first}, mode={self.mode}"

