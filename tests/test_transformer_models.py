"""Real text / transformer models exported from PyTorch and Hugging Face, imported and fine-tuned.

Each model (random weights, batch 8) is exported with both exporters (``torch.onnx.export`` with
``dynamo=True`` and ``dynamo=False``), imported with ``lc.import_onnx``, and checked against oracles no one
here wrote: ``prog.run`` against ONNX Runtime, ``prog.grad`` against PyTorch autograd for every parameter,
5 SGD steps against ``torch.optim.SGD`` from the same weights, and ``export_onnx`` -> ONNX Runtime against
``prog.run`` after training.

Params are randomised before export: PyTorch initialises LayerNorm scales to ones and biases to zeros, and
the dynamo exporter merges equal-valued initializers, so default-initialised models export tied params
(import_onnx warns: test_default_initialised_export_warns_about_tied_params).
"""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch

import libml_compile as lc

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)
B = 8


class _Mlp(torch.nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear (dropout: the identity in the eval-mode export)."""

    def __init__(self):
        super().__init__()
        self.fc0 = torch.nn.Linear(12, 32)
        self.ln = torch.nn.LayerNorm(32)
        self.drop = torch.nn.Dropout(0.1)
        self.fc = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.nn.functional.gelu(self.ln(self.fc0(x)))))


class _TextClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 32)
        self.fc = torch.nn.Linear(32, 4)

    def forward(self, tokens):
        return self.fc(self.emb(tokens).mean(dim=1))


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True,
                                                 dropout=0.0)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.enc(x).mean(dim=1))


class _Bert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                      num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.m = transformers.BertForSequenceClassification(cfg)

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


class _W7(torch.nn.Module):
    """The benchmark workload W7 (../shared/bench/workloads.md): token + learned position embeddings, 2
    GELU TransformerEncoderLayers (d_model 128, 4 heads, ff 512), mean over tokens, Linear 128 -> 2."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(1000, 128), torch.nn.Embedding(64, 128)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, dropout=0.0,
                                             activation="gelu", batch_first=True) for _ in range(2))
        self.fc = torch.nn.Linear(128, 2)

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            h = layer(h)
        return self.fc(h.mean(dim=1))


def _inputs(name, rng):
    if name == "mlp":
        return {"x": rng.standard_normal((B, 12)).astype(np.float32)}
    if name == "text":
        return {"tokens": rng.integers(0, 1000, (B, 16)).astype(np.int64)}
    if name == "encoder":
        return {"x": rng.standard_normal((B, 16, 32)).astype(np.float32)}
    if name == "w7":
        return {"tokens": rng.integers(0, 1000, (16, 64)).astype(np.int64)}
    mask = np.ones((B, 16), np.int64)
    mask[::2, 11:] = 0  # padded sequences: the additive / Where attention mask matters
    # (ids from 1: BERT's embedding has padding_idx 0, whose row PyTorch never trains; an ONNX graph does
    # not carry that, so libml trains it like any row -- the one semantic an export loses here)
    return {"input_ids": rng.integers(1, 100, (B, 16)).astype(np.int64), "attention_mask": mask}


MODELS = {"mlp": _Mlp, "text": _TextClassifier, "encoder": _Encoder, "bert": _Bert, "w7": _W7}
N_CLASSES = {"w7": 2}


def _export(mod, feeds, dynamo, optimize=False):
    f = io.BytesIO()
    args = tuple(torch.tensor(v) for v in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo: optimize=False keeps every parameter as it is in the module (the default optimisation
        # folds weights into transposed / pre-gathered copies: test_default_dynamo_export_warns_...)
        kw = {"dynamo": True, "optimize": optimize} if dynamo else {"dynamo": False}
        torch.onnx.export(mod, args, f, input_names=list(feeds), output_names=["y"], opset_version=18, **kw)
    return f.getvalue()


def _randomised(name, seed=0):
    torch.manual_seed(seed)
    mod = MODELS[name]()
    with torch.no_grad():
        for p in mod.parameters():
            p.uniform_(-0.3, 0.3)
    return mod.eval()


def _match_params(g, mod):
    """{libml param name: torch param name, transposed?}, matched by value (each randomised param is unique);
    the TorchScript exporter may store a Linear weight transposed."""
    tp = {n: p.detach().numpy() for n, p in mod.named_parameters()}
    out = {}
    for name, t in g.params.items():
        v = np.asarray(t.value)
        hits = [(n, False) for n, a in tp.items() if a.shape == v.shape and np.array_equal(a, v)]
        hits += [(n, True) for n, a in tp.items() if a.ndim == 2 and a.T.shape == v.shape and np.array_equal(a.T, v)]
        assert len(hits) == 1, (name, v.shape, hits)
        out[name] = hits[0]
    assert sorted(n for n, _ in out.values()) == sorted(tp), "every torch parameter is a libml param"
    return out


@pytest.fixture(scope="module", params=[(m, d) for m in MODELS for d in (True, False)],
                ids=[f"{m}-{'dynamo' if d else 'torchscript'}" for m in MODELS for d in (True, False)])
def exported(request):
    name, dynamo = request.param
    mod = _randomised(name)
    feeds = _inputs(name, np.random.default_rng(1))
    return name, mod, feeds, _export(mod, feeds, dynamo)


def test_forward_matches_onnxruntime(exported):
    name, mod, feeds, model = exported
    want = ort.InferenceSession(model).run(None, feeds)[0]
    got = lc.compile(lc.import_onnx(model)).run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gradients_match_pytorch_for_every_parameter(exported):
    name, mod, feeds, model = exported
    g = lc.import_onnx(model)
    names = _match_params(g, mod)
    y = g.outputs["y"]
    labels = np.arange(y.shape[0]) % N_CLASSES.get(name, 4)
    lab = g.input("labels", labels.shape, "int64")
    loss = lc.softmax_cross_entropy(y, lab)
    grads = lc.compile(g, loss=loss).grad({**feeds, "labels": labels})
    tmod = copy.deepcopy(mod)
    out = tmod(*[torch.tensor(v) for v in feeds.values()])
    torch.nn.functional.cross_entropy(out, torch.tensor(labels)).backward()
    tg = {n: p.grad.numpy() for n, p in tmod.named_parameters()}
    for k, (tn, tr) in names.items():
        want = tg[tn].T if tr else tg[tn]
        np.testing.assert_allclose(grads[k], want, rtol=1e-3, atol=1e-6, err_msg=f"{k} ({tn})")


def test_five_sgd_steps_follow_torch_and_export_matches_onnxruntime(exported, tmp_path):
    name, mod, feeds, model = exported
    g = lc.import_onnx(model)
    names = _match_params(g, mod)
    labels = np.arange(g.outputs["y"].shape[0]) % N_CLASSES.get(name, 4)
    lab = g.input("labels", labels.shape, "int64")
    loss = lc.softmax_cross_entropy(g.outputs["y"], lab)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.05))
    tmod = copy.deepcopy(mod)
    opt = torch.optim.SGD(tmod.parameters(), lr=0.05)
    args = [torch.tensor(v) for v in feeds.values()]
    for _ in range(5):
        ours = prog.step({**feeds, "labels": labels})
        opt.zero_grad()
        theirs = torch.nn.functional.cross_entropy(tmod(*args), torch.tensor(labels))
        theirs.backward()
        opt.step()
        np.testing.assert_allclose(ours, theirs.item(), rtol=1e-4)
    tp = dict(tmod.named_parameters())
    for k, (tn, tr) in names.items():
        want = tp[tn].detach().numpy()
        np.testing.assert_allclose(prog.params[k], want.T if tr else want, rtol=1e-3, atol=1e-5, err_msg=k)
    path = tmp_path / "tuned.onnx"
    lc.export_onnx(prog, path)
    want = ort.InferenceSession(str(path)).run(None, feeds)[0]
    np.testing.assert_allclose(prog.run(feeds)["y"], want, rtol=1e-4, atol=1e-5)


def test_default_dynamo_export_keeps_constants_frozen_and_warns_about_folded_weights():
    """The default (optimised) dynamo export stores GELU's 0.5 / 1/sqrt(2), the attention scale and mask
    fill values as initializers: imported as constants, never trained.  It also replaces Linear weights by
    transposed copies and the position table by its first 16 rows: import_onnx says so."""
    import onnx
    from libml_compile.onnx_import import FoldedWeightsWarning, classify_initializers
    mod = _randomised("bert")
    feeds = _inputs("bert", np.random.default_rng(1))
    model = _export(mod, feeds, True, optimize=True)
    with pytest.warns(FoldedWeightsWarning, match=r"optimize=False"):
        g = lc.import_onnx(model)
    assert g.meta["onnx_constants"], "the scalar initializers are constants"
    roles = classify_initializers(onnx.load_from_string(model))
    assert all(why.startswith("a scalar") for r, why in roles.values() if r == "constant")
    assert not any(k in g.params for k in g.meta["onnx_constants"])
    want = ort.InferenceSession(model).run(None, feeds)[0]
    np.testing.assert_allclose(lc.compile(g).run(feeds)["y"], want, rtol=1e-4, atol=1e-5)


def test_params_and_constants_can_be_overridden_by_glob_pattern():
    mod = _randomised("mlp")
    feeds = _inputs("mlp", np.random.default_rng(1))
    model = _export(mod, feeds, False)
    g = lc.import_onnx(model, constants=["ln.*"])
    assert not any(k.startswith("ln.") for k in g.params) and "fc.weight" in g.params
    with pytest.raises(ValueError, match="matches no float initializer"):
        lc.import_onnx(model, params=["nothing.*"])
    g = lc.import_onnx(model)
    prog = lc.compile(g, loss=lc.sum(g.outputs["y"]), trainable=["fc.*"])
    assert sorted(prog.grad(feeds)) == ["fc.bias", "fc.weight"]


def test_default_initialised_export_warns_about_tied_params():
    torch.manual_seed(0)
    mod = _Encoder().eval()  # LayerNorm scales are ones, biases zeros: the dynamo exporter merges them
    feeds = _inputs("encoder", np.random.default_rng(1))
    model = _export(mod, feeds, True, optimize=True)
    from libml_compile.onnx_import import TiedParamsWarning
    with pytest.warns(TiedParamsWarning, match="feed several weight slots"):
        lc.import_onnx(model)


def test_bad_token_ids_are_refused_naming_the_input_and_range():
    mod = _randomised("text")
    feeds = _inputs("text", np.random.default_rng(1))
    prog = lc.compile(lc.import_onnx(_export(mod, feeds, False)))
    bad = feeds["tokens"].copy()
    bad[3, 5] = 1000
    with pytest.raises(ValueError, match=r"feed 'tokens': indices must be in \[-1000, 1000\).*got 1000 at \(3, 5\)"):
        prog.run({"tokens": bad})
    with pytest.raises(TypeError, match="tokens"):
        prog.run({"tokens": feeds["tokens"].astype(np.float32)})


def test_mask_of_the_wrong_shape_and_a_sequence_longer_than_the_position_table_are_refused():
    """BERT exported with symbolic batch and sequence dims: binding a sequence of 80 to a model whose
    position table has 64 rows fails at import naming the node and the shapes bound; a mask of the wrong
    shape is refused at the feed boundary naming the input, and nothing runs."""
    from libml_compile.onnx_import import ONNXImportError
    mod = _randomised("bert")
    feeds = _inputs("bert", np.random.default_rng(1))
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        torch.onnx.export(mod, tuple(torch.tensor(v) for v in feeds.values()), f, input_names=list(feeds),
                          output_names=["y"], opset_version=18, dynamo=False, dynamic_axes=dyn)
    with pytest.raises(ONNXImportError, match=r"\(1, 64\).*\(8, 80\).*shapes you bound: input_ids \(8, 80\)"):
        lc.import_onnx(f.getvalue(), shapes={"batch": 8, "seq": 80})
    prog = lc.compile(lc.import_onnx(f.getvalue(), shapes={"batch": 8, "seq": 16}))
    want = prog.run(feeds)["y"]
    with pytest.raises(ValueError, match=r"feed 'attention_mask': expected shape \(8, 16\), got \(8, 15\)"):
        prog.run({**feeds, "attention_mask": feeds["attention_mask"][:, :15]})
    np.testing.assert_array_equal(prog.run(feeds)["y"], want)
