"""FastMaxPool2d: the values of nn.MaxPool2d from two strided-slice maxima, in compressed models and their files.

The properties: on its fast path (2×2, stride 2) it returns what F.max_pool2d returns, bit for bit on
inputs without zeros (NaN where max_pool2d gives NaN), with the same gradients where no window has a
tie; every other configuration is nn.MaxPool2d's own forward. The models bayescomp emits hold it, and a
model file cannot tell it from nn.MaxPool2d: the bytes written are the same, and loading builds it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bayescomp
from bayescomp.compress import compress, graph_compress
from bayescomp.compress.runtime import FastMaxPool2d, with_pooling
from bayescomp.io import load, load_plain, model_spec, pack, save, save_plain, unpack
from bayescomp.io.plain import ModelFileError
from bayescomp.models import build_model
from bayescomp.nn import GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_POOL2D = F.max_pool2d  # the reference, taken before any test replaces F.max_pool2d with a counter


@pytest.fixture
def max_pool2d_calls(monkeypatch) -> Counter:
    """Counts the calls of F.max_pool2d (nn.MaxPool2d.forward looks it up at call time): 0 means the fast path ran."""
    calls: Counter = Counter()

    def counting(*args, **kwargs):
        calls["n"] += 1
        return MAX_POOL2D(*args, **kwargs)

    monkeypatch.setattr(F, "max_pool2d", counting)
    return calls


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _always_fast(pool: FastMaxPool2d) -> FastMaxPool2d:
    pool.min_elements = 0  # the fast path on small test inputs too
    return pool


# ---- the module -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, channels_last", [
    ((4, 8, 24, 24), False), ((3, 5, 13, 9), False), ((2, 3, 32, 31), False), ((6, 17, 11), False), ((5, 2, 3), False),
    ((4, 8, 24, 24), True), ((3, 5, 13, 9), True), ((2, 3, 32, 31), True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_is_max_pool2d_bit_for_bit(shape, channels_last, dtype, max_pool2d_calls):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = _always_fast(FastMaxPool2d(2))(x)
    assert max_pool2d_calls["n"] == 0  # computed by the slices, not by max_pool2d
    expected = MAX_POOL2D(x, 2)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(_bits(got), _bits(expected))
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("settings", [dict(kernel_size=2), dict(kernel_size=(2, 2)), dict(kernel_size=2, stride=2),
                                      dict(kernel_size=2, stride=(2, 2)), dict(kernel_size=(2, 2), stride=None)])
def test_every_spelling_of_two_by_two_takes_the_fast_path(settings, max_pool2d_calls):
    x = torch.randn(4, 8, 24, 24)  # 18432 numbers: above the default min_elements
    assert x.numel() >= FastMaxPool2d.min_elements
    got = FastMaxPool2d(**settings)(x)
    assert max_pool2d_calls["n"] == 0
    assert torch.equal(got, MAX_POOL2D(x, 2))


@pytest.mark.parametrize("settings, shape", [
    (dict(kernel_size=3, stride=2, padding=1), (2, 8, 24, 24)),  # ResNet's stem
    (dict(kernel_size=2, ceil_mode=True), (2, 8, 25, 23)),
    (dict(kernel_size=2, stride=1), (2, 8, 24, 24)),
    (dict(kernel_size=2, padding=1), (2, 8, 24, 24)),
    (dict(kernel_size=2, dilation=2), (2, 8, 24, 24)),
    (dict(kernel_size=(2, 3)), (2, 8, 24, 24)),
])
def test_other_configurations_are_max_pool2d(settings, shape, max_pool2d_calls):
    x = torch.randn(shape)
    got = _always_fast(FastMaxPool2d(**settings))(x)
    assert max_pool2d_calls["n"] == 1
    assert torch.equal(got, MAX_POOL2D(x, **settings))


def test_indices_small_integer_and_too_small_inputs_are_max_pool2d(max_pool2d_calls):
    x = torch.randn(2, 8, 24, 24)
    out, idx = _always_fast(FastMaxPool2d(2, return_indices=True))(x)
    ref, ref_idx = MAX_POOL2D(x, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    small = torch.randn(1, 8, 24, 24)  # 4608 numbers: below min_elements (max_pool2d is faster there)
    assert torch.equal(FastMaxPool2d(2)(small), MAX_POOL2D(small, 2))
    ints = torch.randint(-100, 100, (2, 3, 8, 8))
    assert torch.equal(_always_fast(FastMaxPool2d(2))(ints), MAX_POOL2D(ints, 2))
    assert max_pool2d_calls["n"] == 3
    with pytest.raises(RuntimeError, match="too small"):  # max_pool2d's own error, not an empty result
        _always_fast(FastMaxPool2d(2))(torch.randn(2, 3, 1, 8))


def test_nan_propagates_as_in_max_pool2d(max_pool2d_calls):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 10, 10, generator=gen)
    for i in range(4):  # a NaN in each position of a window, and NaN next to ±inf
        x[0, i, i // 2, i % 2] = float("nan")
    x[1, 0, 0, 0], x[1, 0, 0, 1] = float("inf"), float("nan")
    x[1, 1, 2, 2], x[1, 1, 3, 3] = float("nan"), float("-inf")
    x[2][torch.rand(4, 10, 10, generator=gen) < 0.1] = float("nan")
    got = _always_fast(FastMaxPool2d(2))(x)
    expected = MAX_POOL2D(x, 2)
    assert max_pool2d_calls["n"] == 0
    assert bool(expected[0, :, 0, 0].isnan().all()) and bool(expected[1, 0, 0, 0].isnan())
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_signed_zeros_give_equal_values():
    # the one difference in bits: a tie between +0.0 and -0.0 may keep either sign (equal values)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 16, 33, generator=gen).clamp(max=0.0)
    x[torch.rand(x.shape, generator=gen) < 0.5] = -0.0
    got = _always_fast(FastMaxPool2d(2))(x)
    assert torch.equal(got, MAX_POOL2D(x, 2))


@pytest.mark.parametrize("shape", [(3, 4, 12, 12), (2, 5, 9, 13), (4, 7, 7)])
def test_gradients_agree_without_ties(shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert x.unique().numel() == x.numel()  # no ties
    grad = torch.randn(MAX_POOL2D(x, 2).shape, generator=gen, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (_always_fast(FastMaxPool2d(2))(a) * grad).sum().backward()
    (MAX_POOL2D(b, 2) * grad).sum().backward()
    assert torch.equal(a.grad, b.grad)
    # with ties both send a window's whole gradient to its maxima (max_pool2d to one of them, the slices split it)
    t = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]], requires_grad=True)
    _always_fast(FastMaxPool2d(2))(t).sum().backward()
    assert float(t.grad.sum()) == 1.0 and float(t.grad[0, 0, 1, 0]) == 0.0


def test_it_is_a_max_pool2d_and_with_pooling_swaps_copies():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2),
                          nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.ReLU()))
    fast = with_pooling(model, fast=True)
    assert [type(m) for m in model.modules()].count(nn.MaxPool2d) == 2  # the input is left as it was
    pools = [m for m in fast.modules() if isinstance(m, nn.MaxPool2d)]
    assert [type(m) for m in pools] == [FastMaxPool2d, FastMaxPool2d]
    assert (pools[1].kernel_size, pools[1].stride, pools[1].padding, pools[1].ceil_mode) == (3, 2, 1, True)
    assert fast[0] is not model[0] and torch.equal(fast[0].weight, model[0].weight)
    back = with_pooling(fast, fast=False)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(_always_fast(fast[1])(model[0](x)), model[1](model[0](x)))
    assert type(with_pooling(nn.MaxPool2d(2), fast=True)) is FastMaxPool2d
    custom = type("MyPool", (nn.MaxPool2d,), {})(2)
    assert type(with_pooling(nn.Sequential(custom), fast=True)[0]) is type(custom)  # subclasses left alone


# ---- compressed models --------------------------------------------------------------------------------------


def _compressed_lenet5(seed: int = 0):
    torch.manual_seed(seed)
    bmodel = bayescomp.bayesianize(build_model("lenet5"), "gnj")
    with torch.no_grad():
        for m in bmodel.modules():
            if isinstance(m, GroupSparseLayer):
                m.z_logvar[: m.n_groups // 3] = 5.0  # prune a third of every layer's groups
    return compress(bmodel.eval())


@pytest.fixture(scope="module")
def lenet5():
    return _compressed_lenet5()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_compressed_lenet5_holds_fast_pooling_with_the_same_outputs(lenet5, max_pool2d_calls):
    pools = [type(m) for m in lenet5.model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools == [FastMaxPool2d, FastMaxPool2d]
    plain = with_pooling(lenet5.model, fast=False)
    assert [type(m) for m in plain.modules() if isinstance(m, nn.MaxPool2d)] == [nn.MaxPool2d, nn.MaxPool2d]
    x = torch.randn(64, 1, 28, 28)
    got = _outputs(lenet5.model, x)
    assert max_pool2d_calls["n"] == 0  # both poolings ran the fast path at batch 64
    assert torch.equal(got, _outputs(plain, x))
    assert torch.equal(_outputs(lenet5.model, x[:1]), _outputs(plain, x[:1]))  # batch 1: max_pool2d itself


def test_model_files_cannot_tell_fast_pooling_from_max_pool2d(lenet5, tmp_path):
    plain = dataclasses.replace(lenet5, model=with_pooling(lenet5.model, fast=False))
    save_plain(tmp_path / "fast.pt", lenet5.model)
    save_plain(tmp_path / "plain.pt", plain.model)
    assert (tmp_path / "fast.pt").read_bytes() == (tmp_path / "plain.pt").read_bytes()
    assert pack(lenet5)[0] == pack(plain)[0]
    entries = [e for e in model_spec(lenet5.model) if e["name"].startswith("pool")]
    assert [e["type"] for e in entries] == ["MaxPool2d", "MaxPool2d"]
    assert set(entries[0]["args"]) == {"kernel_size", "stride", "padding", "dilation", "ceil_mode"}


def test_model_pt_and_bcz_load_fast_pooling_with_identical_outputs(lenet5, tmp_path):
    x = torch.randn(32, 1, 28, 28)
    expected = _outputs(lenet5.model, x)
    save_plain(tmp_path / "model.pt", with_pooling(lenet5.model, fast=False))  # as a file from before
    save(lenet5, tmp_path / "model.bcz")
    for loaded in (load_plain(tmp_path / "model.pt")[0], load(tmp_path / "model.bcz")):
        assert [type(m) for m in loaded.modules() if isinstance(m, nn.MaxPool2d)] == [FastMaxPool2d, FastMaxPool2d]
        assert torch.equal(_outputs(loaded, x), expected)


def test_a_max_pool2d_subclass_is_still_refused(tmp_path):
    custom = type("MyPool", (nn.MaxPool2d,), {})(2)
    with pytest.raises(ModelFileError, match="MyPool cannot be stored"):
        save_plain(tmp_path / "m.pt", nn.Sequential(nn.Conv2d(1, 2, 3), custom))


def test_onnx_export_writes_a_standard_max_pool(lenet5, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from bayescomp.io.export import export_onnx, export_safetensors, load_safetensors

    path = export_onnx(lenet5.model, tmp_path / "m.onnx", (1, 28, 28))
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["MaxPool"] == 2 and ops["Max"] == 0 and ops["Slice"] == 0
    assert [type(m) for m in lenet5.model.modules() if isinstance(m, nn.MaxPool2d)] == [FastMaxPool2d] * 2
    x = torch.randn(40, 1, 28, 28)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert abs(got - _outputs(lenet5.model, x).numpy()).max() < 1e-4
    model, _ = load_safetensors(export_safetensors(lenet5.model, tmp_path / "m.safetensors"))
    assert [type(m) for m in model.modules() if isinstance(m, nn.MaxPool2d)] == [FastMaxPool2d] * 2
    assert torch.equal(_outputs(model, x), _outputs(lenet5.model, x))


# ---- graph models -------------------------------------------------------------------------------------------


class _PoolNet(nn.Module):
    """A residual network with 2×2 pooling (not an nn.Sequential: compressed through its torch.fx graph)."""

    def __init__(self, pool: type[nn.MaxPool2d] = nn.MaxPool2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = pool(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = pool(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)) + x)
        return self.fc(torch.flatten(x, 1))


def _graph_compressed(pool: type[nn.MaxPool2d] = nn.MaxPool2d):
    torch.manual_seed(4)
    bmodel = bayescomp.bayesianize(_PoolNet(pool), "gnj").eval()
    keeps = {n: torch.arange(m.n_groups) % 3 != 1 for n, m in bmodel.named_modules() if isinstance(m, GroupSparseLayer)}
    return graph_compress(bmodel, example_input=torch.randn(2, 3, 16, 16), keeps=keeps)


def test_graph_compress_emits_fast_pooling_and_files_round_trip(tmp_path, max_pool2d_calls):
    result = _graph_compressed()
    gm = result.model
    assert isinstance(gm, fx.GraphModule)
    assert [type(m) for m in gm.modules() if isinstance(m, nn.MaxPool2d)] == [FastMaxPool2d, FastMaxPool2d]
    plain = dataclasses.replace(result, model=with_pooling(gm, fast=False))
    assert [type(m) for m in plain.model.modules() if isinstance(m, nn.MaxPool2d)] == [nn.MaxPool2d] * 2
    x = torch.randn(64, 3, 16, 16)
    expected = _outputs(plain.model, x)
    calls = max_pool2d_calls["n"]
    assert torch.equal(_outputs(gm, x), expected)
    assert max_pool2d_calls["n"] == calls  # the graph model's poolings ran the fast path
    save_plain(tmp_path / "fast.pt", gm)
    save_plain(tmp_path / "plain.pt", plain.model)
    assert (tmp_path / "fast.pt").read_bytes() == (tmp_path / "plain.pt").read_bytes()
    data = pack(result)[0]
    assert data == pack(plain)[0]
    for loaded in (load_plain(tmp_path / "plain.pt")[0], unpack(data)[0]):
        assert isinstance(loaded, fx.GraphModule)
        assert [type(m) for m in loaded.modules() if isinstance(m, nn.MaxPool2d)] == [FastMaxPool2d] * 2
        assert torch.equal(_outputs(loaded, x), expected)


def test_graph_compress_traces_through_a_model_that_already_uses_fast_pooling():
    # FastMaxPool2d's forward branches on the input's shape: torch.fx must keep it a leaf
    result = _graph_compressed(FastMaxPool2d)
    reference = _graph_compressed(nn.MaxPool2d)
    assert [type(m) for m in result.model.modules() if isinstance(m, nn.MaxPool2d)] == [FastMaxPool2d] * 2
    x = torch.randn(8, 3, 16, 16)
    assert torch.equal(_outputs(result.model, x), _outputs(reference.model, x))
