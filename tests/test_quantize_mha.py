"""Int8MultiheadAttention and quantize() on models with nn.MultiheadAttention: forward options
against the float module and against an explicit reference built on the same int8 projections,
nn.TransformerEncoder (both layouts, padding masks), save/load, to_float, bad inputs, validate,
evaluate, recipes."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pycompress
from pycompress.nn import Int8Linear, Int8MultiheadAttention
from _pylayer_models import needs_int8

pytestmark = needs_int8

E, H = 32, 4


def _cos(a, b):
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _quiet_quantize(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pycompress.quantize(model, **kw)


# --------------------------------------------------------------------------- reference
def _additive(mask, dtype):
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))


def _reference(qm: Int8MultiheadAttention, query, key, value, key_padding_mask=None, attn_mask=None,
               need_weights=True, average_attn_weights=True):
    """nn.MultiheadAttention's math written out, on the module's own int8 projection layers
    (the packed layer applied whole to each input and its row block taken)."""
    e = qm.embed_dim
    if qm.packed_in_proj:
        q, k, v = qm.in_proj(query)[..., :e], qm.in_proj(key)[..., e:2 * e], qm.in_proj(value)[..., 2 * e:]
    else:
        q, k, v = qm.q_proj(query), qm.k_proj(key), qm.v_proj(value)
    batched = query.dim() == 3
    if not batched:
        q, k, v = q[None], k[None], v[None]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
    elif not qm.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    n, lq, _ = q.shape
    s = k.shape[1]
    h, d = qm.num_heads, qm.head_dim
    mask = torch.zeros(n, h, lq, s)
    if attn_mask is not None:
        am = _additive(attn_mask, torch.float32)
        mask = mask + (am.view(1, 1, lq, s) if am.dim() == 2 else am.view(n, h, lq, s))
    if key_padding_mask is not None:
        mask = mask + _additive(key_padding_mask, torch.float32).view(n, 1, 1, s)
    outs, weights = [], []
    for i in range(h):
        qi, ki, vi = (t[..., i * d:(i + 1) * d] for t in (q, k, v))
        w = torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d) + mask[:, i], dim=-1)
        weights.append(w)
        outs.append(w @ vi)
    out = qm.out_proj(torch.cat(outs, dim=-1))
    w = torch.stack(weights, dim=1)
    if average_attn_weights:
        w = w.mean(dim=1)
    if not batched:
        out, w = out[0], w[0]
    elif not qm.batch_first:
        out = out.transpose(0, 1)
    return out, (w if need_weights else None)


def _inputs(batch_first, kind, n=3, lq=5, s=7, kdim=E, vdim=E, batched=True):
    def t(length, dim):
        if not batched:
            return torch.randn(length, dim)
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)
    if kind == "self":
        x = t(lq, E)
        return x, x, x
    if kind == "kv-shared":
        m = t(s, kdim)
        return t(lq, E), m, m
    return t(lq, E), t(s, kdim), t(s, vdim)


# --------------------------------------------------------------------------- module
FORWARD_OPTIONS = [
    {},
    {"need_weights": False},
    {"average_attn_weights": False},
    {"key_padding_mask": "bool"},
    {"key_padding_mask": "float", "need_weights": False},
    {"attn_mask": "bool"},
    {"attn_mask": "float3d", "need_weights": False},
    {"attn_mask": "float", "key_padding_mask": "bool", "average_attn_weights": False},
]


def _masks(opts, n, lq, s, batched=True):
    out = dict(opts)
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[0, s - 2:] = True
    if opts.get("key_padding_mask") == "bool":
        out["key_padding_mask"] = kpm if batched else kpm[0]
    elif opts.get("key_padding_mask") == "float":
        f = torch.zeros(n, s).masked_fill(kpm, -1e4)
        out["key_padding_mask"] = f if batched else f[0]
    am = opts.get("attn_mask")
    if am == "bool":
        out["attn_mask"] = torch.rand(lq, s) > 0.7
        out["attn_mask"][:, 0] = False  # every query attends to something
    elif am == "float":
        out["attn_mask"] = torch.randn(lq, s)
    elif am == "float3d":
        out["attn_mask"] = torch.randn((n if batched else 1) * H, lq, s)
    return out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "kv-shared", "cross", "kdim-vdim"])
@pytest.mark.parametrize("opts", FORWARD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_forward_options_match_the_float_module_and_the_reference(batch_first, kind, opts):
    kdim, vdim = (24, 40) if kind == "kdim-vdim" else (E, E)
    mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    qm = Int8MultiheadAttention.from_float(mha).eval()
    assert qm.packed_in_proj == (kind != "kdim-vdim")
    query, key, value = _inputs(batch_first, "cross" if kind == "kdim-vdim" else kind, kdim=kdim, vdim=vdim)
    kw = _masks(opts, 3, 5, 5 if kind == "self" else 7)
    with torch.no_grad():
        ref, ref_w = mha(query, key, value, **kw)
        out, w = qm(query, key, value, **kw)
        exp, exp_w = _reference(qm, query, key, value, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # against the float module: quantization error only
    assert _cos(out, ref) > 0.999 and _rel(out, ref) < 0.03
    # against the same int8 projections with the attention written out: float rounding only
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    if kw.get("need_weights", True):
        assert w.shape == ref_w.shape
        torch.testing.assert_close(w, exp_w, rtol=1e-5, atol=1e-6)
        assert (w - ref_w).abs().max() < 0.02
    else:
        assert w is None and ref_w is None


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_projections_are_the_int8_layers_exactly(kind):
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    qm = Int8MultiheadAttention.from_float(mha)
    query, key, value = _inputs(True, kind)
    with torch.no_grad():
        q, k, v = qm._project(query, key, value)
        assert torch.equal(q, qm.in_proj(query)[..., :E])
        assert torch.equal(k, qm.in_proj(key)[..., E:2 * E])
        assert torch.equal(v, qm.in_proj(value)[..., 2 * E:])


@pytest.mark.parametrize("opts", [{}, {"key_padding_mask": "bool"}, {"attn_mask": "float3d"},
                                  {"average_attn_weights": False, "attn_mask": "bool"}])
def test_unbatched_inputs(opts):
    mha = nn.MultiheadAttention(E, H).eval()
    qm = Int8MultiheadAttention.from_float(mha).eval()
    query, key, value = _inputs(False, "cross", batched=False)
    kw = _masks(opts, 1, 5, 7, batched=False)
    with torch.no_grad():
        ref, ref_w = mha(query, key, value, **kw)
        out, w = qm(query, key, value, **kw)
        exp, exp_w = _reference(qm, query, key, value, **kw)
    assert out.shape == ref.shape == (5, E) and w.shape == ref_w.shape
    assert _cos(out, ref) > 0.999
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w, exp_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_uses_the_causal_mask(need_weights):
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    qm = Int8MultiheadAttention.from_float(mha).eval()
    x = torch.randn(2, 6, E)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        ref, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        out, _ = qm(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        exp, _ = _reference(qm, x, x, x, attn_mask=causal)
        # the first position sees only itself: changing later tokens must not change it
        y = x.clone()
        y[:, 1:] = torch.randn(2, 5, E)
        out2, _ = qm(y, y, y, attn_mask=causal, is_causal=True, need_weights=need_weights)
    assert _cos(out, ref) > 0.999
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    assert torch.equal(out2[:, 0], out[:, 0])


def test_dropout_in_training_only():
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    qm = Int8MultiheadAttention.from_float(mha)
    assert qm.training and qm.dropout == 0.5
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        # explicit weights: the same dropout draw as the reference applies to the softmax
        torch.manual_seed(3)
        out, w = qm(x, x, x, average_attn_weights=False)
        exp, exp_w = _reference(qm.eval(), x, x, x, average_attn_weights=False)
        torch.manual_seed(3)
        keep = F.dropout(torch.ones_like(exp_w), p=0.5)
        torch.testing.assert_close(w, exp_w * keep, rtol=1e-5, atol=1e-6)
        qm.train()
        a, _ = qm(x, x, x, need_weights=False)
        b, _ = qm(x, x, x, need_weights=False)
        assert not torch.equal(a, b)  # a fresh dropout draw per call
        qm.eval()
        a, _ = qm(x, x, x, need_weights=False)
        b, _ = qm(x, x, x, need_weights=False)
        assert torch.equal(a, b)
        assert _cos(a, exp) > 0.9999


@pytest.mark.parametrize("mode,extra", [("w8a8", {}), ("w8a8", {"act_bits": 7, "weight_bits": 7}),
                                        ("w8a16", {})])
def test_modes_and_bits_reach_every_projection(mode, extra):
    mha = nn.MultiheadAttention(E, H, kdim=24, vdim=40, batch_first=True).eval()
    qm = Int8MultiheadAttention.from_float(mha, mode=mode, **extra).eval()
    for p in (qm.q_proj, qm.k_proj, qm.v_proj, qm.out_proj):
        assert isinstance(p, Int8Linear) and p.mode == mode
        assert p.act_bits == extra.get("act_bits", 8) and p.weight_bits == extra.get("weight_bits", 8)
    q, k, v = _inputs(True, "cross", kdim=24, vdim=40)
    with torch.no_grad():
        ref, _ = mha(q, k, v)
        out, _ = qm(q, k, v)
    assert _cos(out, ref) > (0.998 if extra else 0.999)


def test_to_float_and_config_round_trip():
    for kdim, bias in ((None, True), (24, False)):
        mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, bias=bias, dropout=0.1, batch_first=True).eval()
        qm = Int8MultiheadAttention.from_float(mha, mode="w8a16").eval()
        f = qm.to_float()
        assert type(f) is nn.MultiheadAttention and not f.training
        assert (f.embed_dim, f.num_heads, f.kdim, f.vdim, f.batch_first, f.dropout) == \
            (mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, mha.batch_first, mha.dropout)
        assert (f.in_proj_bias is None) == (not bias)
        q, k, v = _inputs(True, "cross", kdim=kdim or E, vdim=kdim or E)
        with torch.no_grad():
            # w8a16: activations stay float, so the int8 module is its dequantized float module
            torch.testing.assert_close(qm(q, k, v)[0], f(q, k, v)[0], rtol=1e-4, atol=1e-5)
        # the dequantized weights are within half a quantization step of the original ones
        if kdim is None:
            step = mha.in_proj_weight.abs().amax(1, keepdim=True) / 127
            assert ((f.in_proj_weight - mha.in_proj_weight).abs() <= step / 2 + 1e-7).all()
        again = Int8MultiheadAttention.from_config(qm.config())
        again.load_state_dict(qm.state_dict())
        again.eval()
        with torch.no_grad():
            assert torch.equal(again(q, k, v)[0], qm(q, k, v)[0])
        assert all(isinstance(t, torch.Tensor) and type(t) is torch.Tensor for t in qm.state_dict().values())


def test_bf16_inputs():
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    qm = Int8MultiheadAttention.from_float(mha).eval()
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        out, w = qm(x.bfloat16(), x.bfloat16(), x.bfloat16())
        ref, _ = mha(x, x, x)
    assert out.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    assert _cos(out.float(), ref) > 0.99


def test_bad_inputs_raise_clear_errors():
    qm = Int8MultiheadAttention.from_float(nn.MultiheadAttention(E, H, batch_first=True)).eval()
    x = torch.randn(2, 5, E)
    cases = [
        ((torch.randn(2, 5, E + 1),) * 3, {}, ValueError, "features"),
        ((torch.randn(5, E, 1, 1),) * 3, {}, ValueError, "2-D .*or 3-D"),
        ((x, torch.randn(5, E), torch.randn(5, E)), {}, ValueError, "must be 3-D"),
        ((x, torch.randn(2, 7, E), torch.randn(2, 6, E)), {}, ValueError, "same sequence"),
        ((x, torch.randn(3, 7, E), torch.randn(3, 7, E)), {}, ValueError, "batch size"),
        ((x, x, x), {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError, "key_padding_mask"),
        ((x, x, x), {"attn_mask": torch.zeros(4, 5)}, ValueError, "attn_mask must have shape"),
        ((x, x, x), {"attn_mask": torch.zeros(5, 5, dtype=torch.int64)}, TypeError, "bool or floating"),
        ((x, x, x), {"is_causal": True}, ValueError, "is_causal"),
        ((x.long(),) * 3, {}, TypeError, "floating"),
        (("x", x, x), {}, TypeError, "query must be a torch.Tensor"),
    ]
    for args, kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            qm(*args, **kw)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        Int8MultiheadAttention.from_float(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="add_bias_kv"):
        Int8MultiheadAttention.from_float(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        Int8MultiheadAttention.from_float(nn.MultiheadAttention(E, H, add_zero_attn=True))
    with pytest.raises(ValueError, match="divisible"):
        Int8MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="mode"):
        Int8MultiheadAttention(E, H, mode="w4")


# --------------------------------------------------------------------------- quantize()
class _Tagger(nn.Module):
    """Sequence classifier: self-attention, cross-attention with other key/value widths, a head."""

    def __init__(self, batch_first=True, add_bias_kv=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, add_bias_kv=add_bias_kv)
        self.cross = nn.MultiheadAttention(E, H, kdim=24, vdim=24, batch_first=batch_first)
        self.fc = nn.Linear(E, 5)

    def forward(self, x, mem):
        h, _ = self.attn(x, x, x, need_weights=False)
        h, _ = self.cross(h, mem, mem)
        return self.fc(h)


def test_quantize_converts_attention_as_a_whole():
    torch.manual_seed(0)
    model = _Tagger().eval()
    ref = copy.deepcopy(model)
    q, res = pycompress.quantize(model, return_result=True)
    assert res.converted == ["attn", "cross", "fc"] and res.skipped == {}
    assert isinstance(q.attn, Int8MultiheadAttention) and isinstance(q.cross, Int8MultiheadAttention)
    assert q.attn.packed_in_proj and not q.cross.packed_in_proj
    x, mem = torch.randn(3, 6, E), torch.randn(3, 8, 24)
    with torch.no_grad():
        assert _cos(q(x, mem), ref(x, mem)) > 0.999
    # already converted: nothing left to do
    _, again = pycompress.quantize(q, return_result=True)
    assert again.converted == [] and again.skipped == {}


def test_quantize_options_include_exclude_and_unsupported_attention():
    _, res = _quiet_quantize(_Tagger().eval(), mode="w8a16", return_result=True)
    assert res.converted == ["attn", "cross", "fc"]
    m, res = _quiet_quantize(_Tagger().eval(), act_bits=7, include="cross", return_result=True)
    assert res.converted == ["cross"] and m.cross.out_proj.act_bits == 7 and type(m.attn) is nn.MultiheadAttention
    m, res = _quiet_quantize(_Tagger().eval(), exclude="attn", return_result=True)
    assert res.converted == ["cross", "fc"] and type(m.attn) is nn.MultiheadAttention
    # excluding only a projection keeps the whole attention module in floating point, listed
    m, res = _quiet_quantize(_Tagger().eval(), exclude="cross.out_proj", return_result=True)
    assert res.converted == ["attn", "fc"] and "cross.out_proj" in res.skipped["cross"]
    assert type(m.cross) is nn.MultiheadAttention
    # include of the projection alone: it cannot be converted without its module
    m, res = _quiet_quantize(_Tagger().eval(), include="attn.out_proj", return_result=True)
    assert res.converted == [] and "MultiheadAttention" in res.skipped["attn.out_proj"]
    with pytest.warns(UserWarning, match="attn: nn.MultiheadAttention left in floating point: add_bias_kv"):
        m, res = pycompress.quantize(_Tagger(add_bias_kv=True).eval(), return_result=True)
    assert res.converted == ["cross", "fc"] and set(res.skipped) == {"attn"}
    assert type(m.attn) is nn.MultiheadAttention and type(m.attn.out_proj) is not Int8Linear


def test_quantize_of_a_bare_attention_module_says_to_wrap_it():
    mha = nn.MultiheadAttention(E, H)
    with pytest.warns(UserWarning, match="root module"):
        _, res = pycompress.quantize(mha, return_result=True)
    assert res.converted == [] and "" in res.skipped and type(mha.out_proj) is not Int8Linear
    wrapped = pycompress.quantize(nn.ModuleDict({"attn": mha}))
    assert isinstance(wrapped["attn"], Int8MultiheadAttention)


def test_quantize_refuses_nan_attention_weights_and_leaves_the_model():
    model = _Tagger().eval()
    with torch.no_grad():
        model.cross.k_proj_weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'cross'.*k_proj_weight"):
        pycompress.quantize(model)
    assert type(model.attn) is nn.MultiheadAttention and type(model.fc) is nn.Linear
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k == "cross.k_proj_weight" for k in before)


def _encoder(batch_first, layers=2, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with batch_first=False
        return nn.TransformerEncoder(layer, layers).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first):
    enc = _encoder(batch_first)
    q, res = pycompress.quantize(copy.deepcopy(enc), return_result=True)
    assert res.converted == [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn", "linear1", "linear2")]
    assert not any(n.endswith("out_proj") for n in res.skipped)
    n, s = 3, 9
    x = torch.randn(n, s, E) if batch_first else torch.randn(s, n, E)
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[0, 6:] = True
    kpm[2, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(s)
    valid = ~kpm if batch_first else (~kpm).t()
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": kpm}, {"mask": causal, "is_causal": True},
                   {"mask": causal, "src_key_padding_mask": kpm}):
            ref = enc(x, **kw)
            if ref.is_nested:  # torch's fast path for padded batches (padding rows come back as 0)
                ref = ref.to_padded_tensor(0.0)
            out = q(x, **kw)
            assert out.shape == ref.shape and not out.is_nested
            sel = valid if "src_key_padding_mask" in kw else torch.ones_like(valid)
            assert _cos(out[sel], ref[sel]) > 0.999, kw
        # the int8 encoder runs its layers module by module: the same as calling them one by one
        h = x
        for layer in q.layers:
            h = layer(h, src_key_padding_mask=kpm)
        assert torch.equal(q(x, src_key_padding_mask=kpm), h)
    # a single layer (its own fast path in eval mode)
    layer = q.layers[0]
    with torch.no_grad():
        ref = enc.layers[0](x)
        assert _cos(layer(x), ref) > 0.999


def test_transformer_encoder_with_float_attention_and_int8_feed_forward():
    enc = _encoder(True)
    q = _quiet_quantize(copy.deepcopy(enc), exclude="*.self_attn")
    assert isinstance(q.layers[0].linear1, Int8Linear) and type(q.layers[0].self_attn) is nn.MultiheadAttention
    x = torch.randn(2, 7, E)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        assert _cos(q(x), enc(x)) > 0.999
        ref = enc(x, src_key_padding_mask=kpm)
        ref = ref.to_padded_tensor(0.0) if ref.is_nested else ref
        assert _cos(q(x, src_key_padding_mask=kpm)[~kpm], ref[~kpm]) > 0.999


def test_save_load_round_trip_is_exact(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = _encoder(True)
            self.tag = _Tagger()

        def forward(self, x, mem):
            return self.tag(self.enc(x), mem)

    torch.manual_seed(0)
    net = Net().eval()
    q = pycompress.quantize(copy.deepcopy(net))
    pycompress.save(q, tmp_path / "m")
    torch.manual_seed(5)
    fresh = Net().eval()
    loaded = pycompress.load(tmp_path / "m", fresh)
    assert isinstance(loaded.enc.layers[1].self_attn, Int8MultiheadAttention)
    assert isinstance(loaded.tag.cross, Int8MultiheadAttention) and not loaded.tag.cross.packed_in_proj
    sd, sd2 = q.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, mem = torch.randn(2, 6, E), torch.randn(2, 4, 24)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    with torch.no_grad():
        assert torch.equal(q(x, mem), loaded(x, mem))
        # the fresh encoder would take torch's nested-tensor path; the loaded one must not
        assert torch.equal(q.enc(x, src_key_padding_mask=kpm), loaded.enc(x, src_key_padding_mask=kpm))


def test_validate_and_evaluate_see_the_attention_module():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = _encoder(True)
            self.fc = nn.Linear(E, 5)

        def forward(self, x):
            return self.fc(self.enc(x).mean(1))

    torch.manual_seed(0)
    model = Classifier().eval()
    q = pycompress.quantize(copy.deepcopy(model))
    xs = [torch.randn(4, 6, E) for _ in range(2)]
    rep = pycompress.validate(model, q, xs)
    assert rep.passed
    assert rep.layers["enc.layers.0.self_attn"].reference_type == "MultiheadAttention"
    assert rep.layers["enc.layers.0.self_attn"].candidate_type == "Int8MultiheadAttention"
    assert rep.layers["enc.layers.0.self_attn"].calls == 2 and rep.layers["enc.layers.0.self_attn"].cosine > 0.999
    assert not any("out_proj" in n for n in rep.layers)
    with torch.no_grad():
        data = [(x, model(x).argmax(-1)) for x in xs]
    ev = pycompress.evaluate(q, data, batch_sizes=(2,), warmup=1, repeats=2)
    ev_ref = pycompress.evaluate(model, data, batch_sizes=(2,), warmup=1, repeats=2)
    assert ev.metric >= 0.75
    assert ev.parameters == ev_ref.parameters  # the attention counted as its float equivalent


def test_compress_max_drop_reverts_the_sensitive_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.fc = nn.Linear(E, 5)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))

    def make():
        torch.manual_seed(0)
        m = Net().eval()
        with torch.no_grad():  # an outlier weight on an input feature that is always 0: the float
            m.attn.in_proj_weight[:, 0] = 1e4  # output ignores it, int8 rows lose every other weight
            m.attn.out_proj.weight.mul_(3)
        return m

    g = torch.Generator().manual_seed(1)
    xs = []
    for _ in range(4):
        x = torch.randn(32, 6, E, generator=g)
        x[..., 0] = 0
        xs.append(x)
    ref = make()
    with torch.no_grad():
        data = [(x, ref(x).argmax(-1)) for x in xs]
    recipe = {"steps": [{"quantize": {"mode": "w8a8"}}]}
    _, rep0 = pycompress.compress(make(), recipe, data, metric="accuracy")
    assert rep0.compressed_metric < 0.9
    model, rep = pycompress.compress(make(), recipe, data, metric="accuracy", max_drop=0.02)
    assert [r["layer"] for r in rep.reverted] == ["attn"]
    assert type(model.attn) is nn.MultiheadAttention and isinstance(model.fc, Int8Linear)
    assert rep.within_budget and rep.final_metric >= 0.98


def test_torch_compile():
    pytest.importorskip("torch._dynamo")
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    qm = Int8MultiheadAttention.from_float(mha).eval()
    x = torch.randn(2, 6, E)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    compiled = torch.compile(qm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for kw in ({"need_weights": False}, {"key_padding_mask": kpm}):
            torch.testing.assert_close(compiled(x, x, x, **kw)[0], qm(x, x, x, **kw)[0], rtol=1e-5, atol=1e-5)


def test_transformer_decoder_cross_attention_on_memory():
    torch.manual_seed(0)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2).eval()
    q, res = pycompress.quantize(copy.deepcopy(dec), return_result=True)
    assert {"layers.0.self_attn", "layers.0.multihead_attn", "layers.1.multihead_attn"} <= set(res.converted)
    tgt, mem = torch.randn(2, 5, E), torch.randn(2, 8, E)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    mpm = torch.zeros(2, 8, dtype=torch.bool)
    mpm[1, 6:] = True
    with torch.no_grad():
        for kw in ({}, {"tgt_mask": causal, "tgt_is_causal": True, "memory_key_padding_mask": mpm}):
            assert _cos(q(tgt, mem, **kw), dec(tgt, mem, **kw)) > 0.999


@pytest.mark.slow
def test_export_onnx_runs_in_onnx_runtime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = _encoder(True, layers=1)
            self.cross = nn.MultiheadAttention(E, H, batch_first=True)  # packed, key is value
            self.cross2 = nn.MultiheadAttention(E, H, kdim=24, vdim=24, batch_first=True)

        def forward(self, x, mem):
            h = self.enc(x)
            h = self.cross(h, x, x, need_weights=False)[0]
            return self.cross2(h, mem, mem)[0]

    q = pycompress.quantize(Net().eval())
    x, mem = torch.randn(2, 5, E), torch.randn(2, 3, 24)
    # verify=True: ONNX Runtime's outputs are compared with the model's (raises otherwise)
    path = pycompress.export_onnx(q, (x, mem), str(tmp_path / "m.onnx"))
    assert isinstance(q.cross, Int8MultiheadAttention) and isinstance(q.cross.in_proj, Int8Linear)  # not modified
    import onnx

    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops & {"MatMulIntegerToFloat", "MatMulInteger", "DequantizeLinear"}


def test_torch_export_self_and_cross_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Int8MultiheadAttention.from_float(nn.MultiheadAttention(E, H, batch_first=True)).eval()

        def forward(self, x, mem):
            return self.attn(x, x, x, need_weights=False)[0] + self.attn(x, mem, mem, need_weights=False)[0]

    net = Net().eval()
    x, mem = torch.randn(2, 5, E), torch.randn(2, 7, E)
    ep = torch.export.export(net, (x, mem))
    with torch.no_grad():
        assert torch.equal(ep.module()(x, mem), net(x, mem))


def test_docstring_examples():
    import doctest

    import pycompress.nn.int8_mha as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
