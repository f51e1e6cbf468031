"""Decoder language models through the library: GPT-2 (built from a config, random weights, no
download) whose projections are transformers' ``Conv1D`` (weight stored ``[in, out]``)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import pycompress
from pycompress.nn import conv1d
from _pylayer_models import HAS_INT8
from decoder_reference import linearized

transformers = pytest.importorskip("transformers")
needs_int8 = pytest.mark.skipif(not HAS_INT8, reason="this build has no pycompress.nn.Int8Linear")

VOCAB = 1000
CONV1D_NAMES = [f"transformer.h.{i}.{n}" for i in range(2)
                for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def gpt2_config(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = VOCAB, **kw):
    kw.setdefault("resid_pdrop", 0.0)
    kw.setdefault("embd_pdrop", 0.0)
    kw.setdefault("attn_pdrop", 0.0)
    return transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                                   n_positions=64, bos_token_id=0, eos_token_id=0, **kw)


def gpt2(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config(**kw)).eval()


def token_batches(n: int = 2, batch: int = 4, seq: int = 16, seed: int = 3, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, seq // 2:] = 0  # one right-padded sequence
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- Conv1D recognition
def test_gpt2_projections_are_recognised_as_conv1d():
    model = gpt2()
    found = [n for n, m in model.named_modules() if conv1d.is_conv1d(m)]
    assert found == CONV1D_NAMES
    layer = model.transformer.h[0].mlp.c_fc
    lin = conv1d.to_linear(layer)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(lin(x), layer(x), rtol=0, atol=1e-6)
    assert lin.bias is layer.bias and lin.weight.shape == (256, 64)
    assert conv1d.linear_weight(layer).shape == (256, 64)
    assert not conv1d.is_conv1d(model.lm_head) and not conv1d.is_conv1d(nn.Conv1d(2, 2, 1))


def test_conv1d_is_recognised_without_importing_transformers():
    # a look-alike class from a module named like transformers', in a process where importing
    # transformers fails: recognition and quantization must not need the package
    code = textwrap.dedent("""
        import sys, types, torch
        sys.modules["transformers"] = None  # any import of transformers raises ImportError
        import pycompress
        from pycompress.nn import conv1d

        class Conv1D(torch.nn.Module):
            def __init__(self, nf, nx):
                super().__init__()
                self.nf, self.nx = nf, nx
                self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.1)
                self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)
            def forward(self, x):
                return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)
        Conv1D.__module__ = "transformers.pytorch_utils"

        m = torch.nn.Sequential(Conv1D(32, 16), torch.nn.ReLU(), Conv1D(8, 32))
        assert conv1d.is_conv1d(m[0])
        x = torch.randn(4, 16)
        ref = m(x)
        q, res = pycompress.quantize(m, return_result=True, warn=False)
        assert res.converted == ["0", "2"], res
        err = ((q(x) - ref).norm() / ref.norm()).item()
        assert err < 0.03, err
        assert "transformers" not in [k for k, v in sys.modules.items() if v is not None]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --------------------------------------------------------------------------- quantize
@needs_int8
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantize_gpt2_converts_every_conv1d(mode):
    ref = gpt2()
    model, result = pycompress.quantize(copy.deepcopy(ref), mode=mode, return_result=True)
    assert result.converted == CONV1D_NAMES + ["lm_head"] and result.skipped == {}
    for name in CONV1D_NAMES:
        layer = model.get_submodule(name)
        orig = ref.get_submodule(name)
        assert isinstance(layer, pycompress.nn.Int8Linear) and layer.mode == mode
        assert (layer.in_features, layer.out_features) == (orig.nx, orig.nf)
        # the int8 weight is the transposed Conv1D weight, per output channel
        deq = layer.weight.float() * layer.weight_scale[:, None]
        assert rel_err(deq, orig.weight.detach().t()) < 0.01
    batches = token_batches()
    out, expected = logits(model, batches), logits(ref, batches)
    assert cosine(out, expected) > 0.999 and rel_err(out, expected) < 0.03
    report = pycompress.validate(ref, model, batches, tolerance={"cosine": 0.99, "min_cosine": 0.98})
    assert report.passed and len(report.layers) == len(CONV1D_NAMES) + 1, report.to_markdown()
    assert all(e.cosine > 0.99 for e in report.layers.values())


class _Conv1DSub(transformers.pytorch_utils.Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


def test_quantize_lists_layers_it_cannot_convert():
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), _Conv1DSub(8, 8),
                          transformers.pytorch_utils.Conv1D(8, 8))
    broken = transformers.pytorch_utils.Conv1D(8, 8)
    broken.weight = nn.Parameter(torch.zeros(4, 4))  # not the [nx, nf] layout
    model.append(broken)
    with pytest.warns(UserWarning, match="left in floating point"):
        _, result = pycompress.quantize(model, return_result=True)
    assert result.converted == ["2", "5"]
    assert set(result.skipped) == {"0", "4", "6"}
    assert "Conv1d" in result.skipped["0"] and "subclass" in result.skipped["4"]
    assert "layout" in result.skipped["6"]


# --------------------------------------------------------------------------- prune / compact
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "channel"])
@pytest.mark.parametrize("method", ["magnitude", "activation", "mixed"])
def test_prune_gpt2_conv1d_as_the_equal_linear_model(pattern, method):
    model = gpt2()
    ref = linearized(model)
    batches = token_batches()
    torch.testing.assert_close(logits(ref, batches), logits(model, batches), rtol=0, atol=1e-5)
    sparsity = None if pattern == "2:4" else 0.5
    kw = dict(pattern=pattern, method=method, exclude="lm_head", calibration_data=batches)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in CONV1D_NAMES}
    pycompress.prune(model, sparsity, **kw)
    pycompress.prune(ref, sparsity, **kw)
    for name in CONV1D_NAMES:
        got, want = model.get_submodule(name), ref.get_submodule(name)
        assert isinstance(got, pycompress.nn.MaskedLinear) and isinstance(want, pycompress.nn.MaskedLinear)
        assert got.mask.shape == originals[name].t().shape
        assert torch.equal(got.mask, want.mask), name
        assert torch.equal(got.weight, originals[name].t() * got.mask)
    torch.testing.assert_close(logits(model, batches), logits(ref, batches), rtol=0, atol=1e-5)
    masks = [model.get_submodule(n).mask for n in CONV1D_NAMES]
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert abs(kept - 0.5) < 0.02


def test_prune_gpt2_keeps_bias_and_trains_the_masked_layers():
    model = gpt2().train()
    bias = model.transformer.h[0].mlp.c_fc.bias
    pycompress.prune(model, 0.5, exclude="lm_head")
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.bias is bias  # the bias Parameter is kept; the weight is the new transposed one
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = token_batches(1)[0]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.weight.grad is not None and torch.all(layer.weight.grad[~layer.mask] == 0)
    opt.step()
    assert torch.all(layer.weight[~layer.mask] == 0)


def test_gradual_pruning_puts_the_new_conv1d_weights_into_the_optimizer():
    model = gpt2().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = token_batches(1)[0]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # the optimizer holds state of the Conv1D weights [in, out]
    old = model.transformer.h[0].attn.c_attn.weight
    old_avg = opt.state[old]["exp_avg"].clone()
    sched = pycompress.GradualPruning(model, final_sparsity=0.5, total_steps=2, exclude="lm_head",
                                      optimizer=opt)
    new = model.transformer.h[0].attn.c_attn.weight
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(new) in params and id(old) not in params
    assert torch.equal(opt.state[new]["exp_avg"], old_avg.t())
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
    layers = [model.get_submodule(n) for n in CONV1D_NAMES]
    pruned = sum(int((~m.mask).sum()) for m in layers) / sum(m.mask.numel() for m in layers)
    assert sched.current_sparsity == 0.5 and abs(pruned - 0.5) < 0.02
    assert all(torch.all(m.weight[~m.mask] == 0) for m in layers)


def test_compact_gpt2_mlp_neurons():
    model = gpt2()
    batches = token_batches()
    pycompress.prune(model, 0.5, pattern="channel", scope="layer", method="activation",
                     calibration_data=batches, exclude="lm_head")
    masked = logits(model, batches)
    model, report = pycompress.compact(model, batches, return_report=True)
    shrunk = {c["layer"]: c for c in report.compacted}
    for i in range(2):
        c = shrunk[f"transformer.h.{i}.mlp.c_fc"]
        assert c["kind"] == "channels" and c["consumers"] == [f"transformer.h.{i}.mlp.c_proj"]
        mlp = model.transformer.h[i].mlp
        assert (mlp.c_fc.in_features, mlp.c_fc.out_features) == (64, 128)
        assert mlp.c_proj.in_features == 128
    # attention projections feed reshapes / a residual add: they stay masked, with the reason
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj"):
        assert name in report.refused and report.refused[name]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    torch.testing.assert_close(logits(model, batches), masked, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- export / save / load
@needs_int8
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_export_onnx_quantized_gpt2(mode, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = pycompress.quantize(gpt2(), mode=mode)
    batch = token_batches(1)[0]
    path = pycompress.export_onnx(model, dict(batch), tmp_path / "gpt2.onnx")  # verify=True
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat") == (9 if mode == "w8a8" else 0)
    assert ops.count("DequantizeLinear") == (0 if mode == "w8a8" else 9)
    # another batch (other size) through ONNX Runtime agrees with the PyTorch model
    other = token_batches(1, batch=2, seed=11)[0]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: v.numpy() for k, v in other.items()})[0]
    assert cosine(torch.from_numpy(out), logits(model, [other])) > 0.999


@needs_int8
def test_save_load_quantized_gpt2_is_exact(tmp_path):
    model = pycompress.quantize(gpt2(), mode="w8a8")
    pycompress.save(model, tmp_path / "gpt2-int8")
    fresh = pycompress.load(tmp_path / "gpt2-int8", gpt2(seed=1))
    batches = token_batches()
    assert torch.equal(logits(fresh, batches), logits(model, batches))
    assert isinstance(fresh.transformer.h[1].mlp.c_fc, pycompress.nn.Int8Linear)
    with pytest.raises(ValueError, match="architecture mismatch|do not fit"):
        pycompress.load(tmp_path / "gpt2-int8", gpt2(n_embd=128))


def test_save_load_pruned_and_compacted_gpt2_is_exact(tmp_path):
    batches = token_batches()
    model = gpt2()
    pycompress.prune(model, 0.5, exclude="lm_head")
    pycompress.save(model, tmp_path / "masked")
    fresh = pycompress.load(tmp_path / "masked", gpt2(seed=1))
    assert torch.equal(logits(fresh, batches), logits(model, batches))
    assert isinstance(fresh.transformer.h[0].attn.c_attn, pycompress.nn.MaskedLinear)

    model = gpt2()
    pycompress.prune(model, 0.25, pattern="channel", scope="layer", include="*.mlp.c_fc")
    pycompress.compact(model)
    pycompress.save(model, tmp_path / "compact")
    fresh = pycompress.load(tmp_path / "compact", gpt2(seed=1))
    assert type(fresh.transformer.h[0].mlp.c_fc) is nn.Linear and fresh.transformer.h[0].mlp.c_fc.out_features == 192
    assert torch.equal(logits(fresh, batches), logits(model, batches))


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_prune_and_compact_gpt2_attention_heads(method, tmp_path):
    model = gpt2()
    batches = token_batches()
    h, d = 4, 16
    # the reference head scores: mean |w| of the head's q, k, v rows (Conv1D columns), or the mean
    # |x| of the head's slice of c_proj's input
    inputs = {}
    hooks = [model.transformer.h[i].attn.c_proj.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].detach().reshape(-1, h * d)))
        for i in range(2)]
    logits(model, batches)
    for hk in hooks:
        hk.remove()
    expected_drop = []
    for i in range(2):
        if method == "magnitude":
            w = model.transformer.h[i].attn.c_attn.weight.detach().abs()  # [in, 3 * h * d]
            score = w.sum(0).reshape(3, h, d).sum((0, 2))
        else:
            score = torch.cat(inputs[i]).abs().mean(0).reshape(h, d).mean(1)
        expected_drop.append(torch.sort(score, stable=True).indices[:2].sort().values.tolist())
    pycompress.prune(model, 0.5, pattern="head", scope="layer", method=method, calibration_data=batches)
    for i in range(2):
        c_attn = model.transformer.h[i].attn.c_attn
        assert isinstance(c_attn, pycompress.nn.MaskedLinear)
        dead = (~c_attn.mask.any(1)).reshape(3, h, d)
        assert dead.all(2).all(0).nonzero().flatten().tolist() == expected_drop[i]
        assert torch.equal(dead.all(2)[0], dead.all(2)[2])  # query, key and value rows alike
    masked = logits(model, batches)
    model, report = pycompress.compact(model, batches, return_report=True)
    heads = [c for c in report.compacted if c["kind"] == "heads"]
    assert [c["layer"] for c in heads] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(c["removed"] == 2 and c["after"] == [2, d] for c in heads)
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size) == (2, 2 * d)
    assert attn.c_attn.out_features == 3 * 2 * d and attn.c_proj.in_features == 2 * d
    torch.testing.assert_close(logits(model, batches), masked, rtol=0, atol=1e-4)
    # a model with fewer heads saves and loads into a fresh GPT-2
    pycompress.save(model, tmp_path / "heads")
    fresh = pycompress.load(tmp_path / "heads", gpt2(seed=1))
    assert fresh.transformer.h[1].attn.num_heads == 2
    assert torch.equal(logits(fresh, batches), logits(model, batches))


# --------------------------------------------------------------------------- causal-LM distillation
from torch.utils.data import Dataset, default_collate  # noqa: E402

from pycompress.distillation.causal_lm import CausalLMDataset, next_token_targets  # noqa: E402


class TokenSet(Dataset):
    """Token samples: right- and left-padded sequences, ignored prompt labels."""

    def __init__(self, n: int = 6, seq: int = 12, seed: int = 5, with_labels: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[0, seq - 4:] = 0       # right padding
        self.mask[2, :3] = 0             # left padding
        self.labels = self.ids.masked_fill(self.mask == 0, -100)
        self.labels[1, :5] = -100        # a prompt that is not learned
        self.with_labels = with_labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        out = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.with_labels:
            out["labels"] = self.labels[i]
        return out


def reference_kd_loss(student, teacher, batch, temperature, alpha):
    """The causal-LM distillation objective in plain PyTorch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1]
    target = batch["labels"][:, 1:]
    real = batch["attention_mask"].bool()
    keep = (target != -100) & real[:, 1:] & real[:, :-1]
    s_k, t_k = s[keep], t[keep]
    T = temperature
    kd = torch.nn.functional.kl_div(torch.log_softmax(s_k / T, -1), torch.log_softmax(t_k / T, -1),
                                    log_target=True, reduction="sum") / keep.sum() * T * T
    ce = torch.nn.functional.cross_entropy(s_k, target[keep])
    return alpha * kd + (1 - alpha) * ce


def student_teacher():
    return gpt2(seed=1, n_layer=1, n_embd=32, n_head=2), gpt2(seed=2)


def test_next_token_targets():
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    labels = torch.tensor([[-100, 6, 7, 8, 9], [1, 2, -100, 4, -100]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    out = next_token_targets(ids, labels, mask)
    assert out.tolist() == [[-100, 7, 8, 9, -100], [2, -100, 4, -100, -100]]
    assert next_token_targets(ids).tolist() == [[6, 7, 8, 9, -100], [2, 3, 4, 0, -100]]
    with pytest.raises(ValueError, match="shape of input_ids"):
        next_token_targets(ids, labels[:, :3])


@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (1.0, 1.0), (4.0, 0.0)])
def test_causal_lm_kd_loss_and_gradients_match_plain_pytorch(temperature, alpha):
    student, teacher = student_teacher()
    ds = TokenSet()
    batch = default_collate([ds[i] for i in range(len(ds))])
    ref_student = copy.deepcopy(student)
    ref = reference_kd_loss(ref_student, teacher, batch, temperature, alpha)
    ref.backward()
    # the pieces distill uses: shifted targets, unsliced logits, the fused KD loss
    inputs, target = default_collate([CausalLMDataset(ds)[i] for i in range(len(ds))])
    assert set(inputs) == {"input_ids", "attention_mask"}
    s = student(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    loss = pycompress.nn.KDLoss(temperature=temperature, alpha=alpha)(s, t, target)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (1.0, 1.0)])
def test_distill_gpt2_one_step_equals_plain_pytorch(temperature, alpha):
    student, teacher = student_teacher()
    ds = TokenSet()
    lr = 0.5
    ref_student = copy.deepcopy(student).train()
    batch = default_collate([ds[i] for i in range(len(ds))])
    ref = reference_kd_loss(ref_student, teacher, batch, temperature, alpha)
    ref.backward()
    with torch.no_grad():
        expected = {n: p - lr * p.grad for n, p in ref_student.named_parameters()}
    out, history = pycompress.distill(teacher, student, ds, epochs=1, batch_size=len(ds), shuffle=False,
                                      temperature=temperature, alpha=alpha, progress=False,
                                      optimizer=lambda params: torch.optim.SGD(params, lr=lr))
    assert history[0]["loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    for n, p in out.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6, msg=n)
    # next-token accuracy over the kept tokens only
    assert 0.0 <= history[0]["accuracy"] <= 1.0


def test_distill_gpt2_from_precomputed_teacher_logits(tmp_path):
    student, teacher = student_teacher()
    ds = TokenSet(n=8)
    path = pycompress.precompute_teacher_logits(teacher, ds, tmp_path / "t.npy", batch_size=3, dtype="float32")
    saved = torch.from_numpy(__import__("numpy").load(path))
    assert saved.shape == (8, 12, VOCAB)
    inputs = default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        direct = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(saved, direct, rtol=1e-5, atol=1e-5)
    kw = dict(epochs=2, batch_size=4, seed=3, temperature=2.0, alpha=0.5, progress=False, lr=1e-3)
    online, h_online = pycompress.distill(teacher, copy.deepcopy(student), ds, **kw)
    offline, h_offline = pycompress.distill(None, copy.deepcopy(student), pycompress.TeacherLogitsDataset(ds, path),
                                            **kw)
    for (n, p), q in zip(online.named_parameters(), offline.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    assert [h["loss"] for h in h_online] == pytest.approx([h["loss"] for h in h_offline], rel=1e-5)
    assert h_online[1]["loss"] < h_online[0]["loss"]


def test_distill_token_data_needs_a_known_objective():
    student, teacher = student_teacher()
    ds = TokenSet(with_labels=False)

    class Wrapped(nn.Module):  # not recognisable as a causal LM by its class name
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw).logits

    with pytest.raises(ValueError, match="causal_lm=True"):
        pycompress.distill(teacher, Wrapped(student), ds, epochs=1, progress=False)
    # told so, it trains: targets come from input_ids when the samples carry no labels
    _, history = pycompress.distill(teacher, Wrapped(student), ds, epochs=1, batch_size=3, progress=False,
                                    causal_lm=True)
    assert history[0]["samples"] == len(ds) and history[0]["loss"] > 0
    pairs = [(torch.randn(4), 1)] * 4
    with pytest.raises(ValueError, match="causal_lm=True needs"):
        pycompress.distill(teacher, student, pairs, causal_lm=True, progress=False)


# --------------------------------------------------------------------------- evaluate
def held_out(n: int = 3, batch: int = 4, seq: int = 16):
    out = []
    for i, b in enumerate(token_batches(n, batch, seq, seed=40)):
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        if i == 1:
            b["labels"][1, :4] = -100
        out.append(b)
    return out


def test_perplexity_equals_a_direct_computation():
    model = gpt2()
    data = held_out()
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in data:
            lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            real = b["attention_mask"].bool()
            keep = (target != -100) & real[:, 1:] & real[:, :-1]
            nll += torch.nn.functional.cross_entropy(lg[keep].double(), target[keep], reduction="sum").item()
            count += int(keep.sum())
    expected = float(torch.tensor(nll / count).exp())
    report = pycompress.evaluate(model, data, metric="perplexity", batch_sizes=(1, 4), repeats=2, warmup=1)
    assert report.metric_name == "perplexity" and not report.higher_is_better
    assert report.metric == pytest.approx(expected, rel=1e-5)
    # without padding and ignored labels, the model's own loss says the same
    plain = token_batches(1, pad=False, seed=41)[0]
    with torch.no_grad():
        hf = float(model(**plain, labels=plain["input_ids"]).loss.exp())
    assert pycompress.evaluate(model, plain, metric="perplexity", batch_sizes=()).metric == pytest.approx(hf, rel=1e-5)
    # tokens per second at both batch sizes: the batch's tokens over the mean time
    for bs, lat in report.latency.items():
        assert lat["tokens_per_s"] > 0
        assert lat["tokens_per_s"] / lat["throughput"] == pytest.approx(_tokens_in_first_rows(data, bs) / bs,
                                                                        rel=1e-9)


def _tokens_in_first_rows(data, n):
    mask = torch.cat([b["attention_mask"] for b in data])
    return int(mask[:n].sum())


@needs_int8
def test_compare_teacher_student_int8_w8a16():
    teacher, student = gpt2(seed=2), gpt2(seed=1, n_layer=1, n_embd=32, n_head=2)
    data = held_out(2)
    kw = dict(metric="perplexity", batch_sizes=(1, 4), repeats=2, warmup=1)
    base = pycompress.evaluate(teacher, data, name="teacher", **kw)
    reports = [base, pycompress.evaluate(student, data, name="student", reference=base, **kw)]
    for mode in ("w8a8", "w8a16"):
        q = pycompress.quantize(copy.deepcopy(student), mode=mode)
        reports.append(pycompress.evaluate(q, data, name=f"student {mode}", reference=base, **kw))
    table = pycompress.compare(reports)
    header = table.splitlines()[0]
    assert "perplexity" in header and "bs1 tokens/s" in header and "bs4 tokens/s" in header
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "teacher", "student", "student w8a8", "student w8a16"]
    # int8 keeps the student's perplexity within a few percent (random weights: ppl ~ vocab size)
    for r in reports[2:]:
        assert r.metric == pytest.approx(reports[1].metric, rel=0.05)
        assert r.parameters == reports[1].parameters and r.compression_ratio is not None
