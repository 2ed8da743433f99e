"""Storing graph-compressed models (residual sums, concatenations): model.pt and .bcz round trips, refusals.

The property: a `torch.fx.GraphModule` made by `graph_compress` goes into a model file (JSON graph +
tensors, or the packed .bcz) and comes back as a GraphModule with the same tensors that computes the
same outputs. The masks prune channels inside the blocks and across the shortcuts (every writer of a
residual stream loses the same channels), so the stored graphs hold Select/Realign/AppendOnes helpers,
not just convolutions. A file whose graph names an unknown function, layer type or node, or smuggles
code into a name, is refused with ModelFileError / PackedFileError before anything runs.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import bcz_assemble as _assemble
from helpers import bcz_parts as _parts
from helpers import mutate_json, randomise
from helpers import random_keeps as _random_keeps
from torch import fx, nn

import bayescomp
from bayescomp.compress import AppendOnes, Realign, graph_compress
from bayescomp.compress.rules import FUNCTION_RULES, METHOD_RULES
from bayescomp.io import packed_reader
from bayescomp.io.graphs import FUNCTION_NAMES
from bayescomp.io.packed import FLAG_GRAPH, PackedFileError, pack, packed_report, read_packed, unpack
from bayescomp.io.plain import (
    GRAPH_VERSION,
    LAYERS,
    METHODS,
    VERSION,
    ModelFileError,
    build_graph,
    graph_spec,
    load_plain,
    save_plain,
)
from bayescomp.models import build_model
from bayescomp.models.resnet import concat_net, resnet18_cifar, resnet20_cifar, resnet_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- models -------------------------------------------------------------------------------------------------


def _prune_residual_streams(bmodel: nn.Module, keeps: dict[str, torch.Tensor], stem: str, gen: torch.Generator) -> None:
    """Drop the same channels in every layer writing a stage's residual stream (pruning across the shortcuts)."""
    stage = 1
    while hasattr(bmodel, f"layer{stage}"):
        blocks = list(getattr(bmodel, f"layer{stage}"))
        first = f"layer{stage}.0.downsample.0" if blocks[0].downsample is not None else stem
        writers = [first] + [f"layer{stage}.{i}.conv2" for i in range(len(blocks))]
        width = keeps[writers[0]].numel()
        gone = torch.randperm(width, generator=gen)[: max(2, width // 8)]
        kept = int(torch.nonzero(~torch.isin(torch.arange(width), gone))[0])
        for w in writers:
            keeps[w][gone] = False
            keeps[w][kept] = True
        stage += 1


MODELS = {  # name: (constructor, input shape, stem layer or None (no residual streams), keep probability)
    "resnet20": (resnet20_cifar, (2, 3, 32, 32), "stem.0", 0.6),
    "resnet18_cifar": (resnet18_cifar, (2, 3, 32, 32), "conv1", 0.3),
    "resnet_mnist": (resnet_mnist, (2, 1, 28, 28), "stem.0", 0.6),
    "concat_net": (concat_net, (2, 3, 16, 16), None, 0.5),
}


def _compressed(name: str):
    ctor, shape, stem, p = MODELS[name]
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    bmodel = bayescomp.bayesianize(ctor(), "gnj")
    randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen, p)
    if stem is not None:
        _prune_residual_streams(bmodel, keeps, stem, gen)
    x = torch.randn(*shape, generator=gen)
    return graph_compress(bmodel, example_input=x, keeps=keeps), x


@pytest.fixture(scope="module")
def compressed():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _compressed(name)
        return cache[name]

    return get


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _outputs(model: nn.Module, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def _assert_same_outputs(a, b) -> None:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        assert torch.allclose(u, v, atol=1e-6, rtol=0), (u - v).abs().max()


# ---- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_model_pt_round_trip(compressed, name, tmp_path):
    result, x = compressed(name)
    gm = result.model
    kinds = {type(m) for m in gm.modules()}
    if name != "concat_net":  # the masks really prune across shortcuts: constants are put back in the sums
        assert Realign in kinds and AppendOnes in kinds
    save_plain(tmp_path / "model.pt", gm, {"architecture": result.report["architecture"]})
    loaded, meta = load_plain(tmp_path / "model.pt")
    assert isinstance(loaded, fx.GraphModule) and not loaded.training
    assert type(loaded).__name__ == type(gm).__name__
    assert meta["architecture"] == result.report["architecture"]
    _same_tensors(gm, loaded)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in gm.modules()]
    _assert_same_outputs(_outputs(gm, x), _outputs(loaded, x))
    # the file is a plain dict of strings and tensors: it loads with weights_only=True and holds no code
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["version"] == GRAPH_VERSION and "spec" not in state
    assert json.loads(state["graph"])["class_name"] == type(gm).__name__


@pytest.mark.parametrize("name", list(MODELS))
def test_bcz_round_trip(compressed, name, tmp_path):
    result, x = compressed(name)
    path = tmp_path / "model.bcz"
    info = bayescomp.save(result, path)
    data = path.read_bytes()
    _, version, flags, _ = struct.unpack_from("<8sHHQ", data)
    assert version == 1 and flags == FLAG_GRAPH
    loaded = bayescomp.load(path)
    assert isinstance(loaded, fx.GraphModule) and not loaded.training
    _same_tensors(result.model, loaded)  # quantised weights come back bit for bit
    _assert_same_outputs(_outputs(result.model, x), _outputs(loaded, x))
    # every quantised layer went through the sparse coder, under its original (dotted) name
    sparse = {r["layer"] for r in info["records"] if r["encoding"] == "sparse"}
    assert sparse == {k for k, b in result.bits.items() if b is not None}
    figures = packed_report(result, path)
    assert figures["verified"] and figures["cr_max"] > 1 and figures["cr_file"] > 1


def test_unpacked_bcz_saves_as_model_pt(compressed, tmp_path):
    """`bayescomp unpack`: .bcz → GraphModule → model.pt → GraphModule, same tensors throughout."""
    result, x = compressed("resnet_mnist")
    bayescomp.save(result, tmp_path / "m.bcz")
    model, meta = read_packed(tmp_path / "m.bcz")
    save_plain(tmp_path / "m.pt", model, {"architecture": meta.get("architecture")})
    again, _ = load_plain(tmp_path / "m.pt")
    _same_tensors(result.model, again)
    _assert_same_outputs(_outputs(result.model, x), _outputs(again, x))


class _MobileBlockNet(nn.Module):
    """Functions, tensor methods with keyword arguments, a depthwise conv and a view-flatten in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.dw(F.relu6(self.expand(x))))
        x = x + self.project(y)
        x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        x = F.adaptive_avg_pool2d(x, 4)
        return self.fc(x.view(x.size(0), -1))


class _TwoInTwoOut(nn.Module):
    """Two inputs, a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, a, b):
        f = self.conv_a(a) - 0.5 * self.conv_b(b)
        return self.fc(f.mean((2, 3))), f


def _dead_branch():
    gen = torch.Generator().manual_seed(9)
    bmodel = bayescomp.bayesianize(resnet_mnist(), "gnj")
    randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen, 0.6)
    keeps["layer1.0.conv2"][:] = False  # the branch adds a stored constant to the identity (a get_attr node)
    x = torch.randn(2, 1, 28, 28, generator=gen)
    return graph_compress(bmodel, example_input=x, keeps=keeps), x


def _mobile():
    gen = torch.Generator().manual_seed(7)
    bmodel = bayescomp.bayesianize(_MobileBlockNet(), "gnj")
    keeps = _random_keeps(bmodel, gen, 0.5)
    x = torch.randn(3, 3, 12, 12, generator=gen)
    return graph_compress(bmodel, example_input=x, keeps=keeps), x


def _two_in_two_out():
    gen = torch.Generator().manual_seed(8)
    bmodel = bayescomp.bayesianize(_TwoInTwoOut(), "gnj")
    keeps = _random_keeps(bmodel, gen, 0.6)
    x = (torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 2, 5, 5, generator=gen))
    return graph_compress(bmodel, example_input=x, keeps=keeps), x


class _InputNamedInput(nn.Module):
    """forward(self, input): fx names the node input_1 (input is a builtin), the generated forward keeps `input`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, input):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(input)) + input, 1), 1))


def _input_named_input():
    gen = torch.Generator().manual_seed(4)
    bmodel = bayescomp.bayesianize(_InputNamedInput(), "gnj")
    keeps = _random_keeps(bmodel, gen, 0.6)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    return graph_compress(bmodel, example_input=x, keeps=keeps), x


@pytest.mark.parametrize("make", [_dead_branch, _mobile, _two_in_two_out, _input_named_input])
def test_other_graph_shapes_round_trip(make, tmp_path):
    result, x = make()
    ops = {n.op for n in result.model.graph.nodes}
    save_plain(tmp_path / "m.pt", result.model)
    loaded, _ = load_plain(tmp_path / "m.pt")
    _same_tensors(result.model, loaded)
    _assert_same_outputs(_outputs(result.model, x), _outputs(loaded, x))
    bayescomp.save(result, tmp_path / "m.bcz")
    from_bcz = bayescomp.load(tmp_path / "m.bcz")
    _same_tensors(result.model, from_bcz)
    _assert_same_outputs(_outputs(result.model, x), _outputs(from_bcz, x))
    if make is _dead_branch:
        assert "get_attr" in ops
    if make is _mobile:
        assert "call_method" in ops


def test_chain_files_keep_version_1_and_no_flag(tmp_path):
    """Chains are written exactly as before, so readers from before graphs could be stored still read them."""
    torch.manual_seed(0)
    result = bayescomp.compress(bayescomp.bayesianize(build_model("lenet5")))
    data, _ = pack(result)
    assert struct.unpack_from("<8sHHQ", data)[1:3] == (1, 0)
    save_plain(tmp_path / "m.pt", result.model)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["version"] == VERSION == 1 and isinstance(json.loads(state["spec"]), list)
    assert isinstance(load_plain(tmp_path / "m.pt")[0], nn.Sequential)


def test_a_reader_without_the_graph_flag_refuses_graph_files(compressed, monkeypatch):
    result, _ = compressed("concat_net")
    data, _ = pack(result)
    monkeypatch.setattr(packed_reader, "KNOWN_FLAGS", 0)  # what a bayescomp from before graph files does
    with pytest.raises(PackedFileError, match="features this bayescomp does not know"):
        unpack(data)


# ---- the whitelists ---------------------------------------------------------------------------------------


def test_whitelists_cover_what_graph_compress_emits():
    # every function with a rule is re-emitted as it is, except reshapes, which are emitted as torch.flatten
    functions = {f for f, rule in FUNCTION_RULES.items() if rule.kind != "flatten"} | {torch.flatten}
    missing = [getattr(f, "__name__", f) for f in functions if f not in FUNCTION_NAMES]
    assert not missing
    methods = {m for m, rule in METHOD_RULES.items() if rule.kind != "flatten"}
    assert methods <= METHODS
    for cls in (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, Realign, AppendOnes, nn.ReLU, nn.Sigmoid):
        assert LAYERS[cls.__name__][0] is cls


class _Rolls(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=1)


class _Upsamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up(x)


class _Reshapes(nn.Module):
    def forward(self, x):
        return x.cumsum(1)


class _TorchNamedInput(nn.Module):
    def forward(self, torch):
        return torch.relu()


@pytest.mark.parametrize("model, match", [
    (_TorchNamedInput, r"'torch' is a reserved name"),
    (_Rolls, r"node 'roll': function 'roll' is not in the whitelist"),
    (_Upsamples, r"up: Upsample cannot be stored"),
    (_Reshapes, r"node 'cumsum': tensor method 'cumsum' is not in the whitelist"),
])
def test_what_cannot_be_stored_is_named_at_save(model, match, tmp_path):
    gm = fx.symbolic_trace(model())
    with pytest.raises(ModelFileError, match=match):
        save_plain(tmp_path / "m.pt", gm)
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(ValueError, match=match):
        pack(gm)


# ---- corrupt and hostile files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(compressed):
    """The stored form of a small compressed residual net: (result, input, model.pt state, graph description)."""
    result, x = compressed("resnet_mnist")
    spec = graph_spec(result.model)
    return result, x, spec


def _node(spec, pred):
    return next(n for n in spec["nodes"] if pred(n))


def _edit_unknown_function(spec):
    _node(spec, lambda n: n["op"] == "call_function")["target"] = "builtins.eval"


def _edit_os_system(spec):
    _node(spec, lambda n: n["op"] == "call_function")["target"] = "os.system"


def _edit_unknown_module(spec):
    spec["modules"][0]["type"] = "Evil"


def _edit_missing_node(spec):
    node = _node(spec, lambda n: n["op"] == "call_function")
    node["args"][0] = {"node": "no_such_node"}


def _edit_forward_reference(spec):
    last = spec["nodes"][-2]["name"]
    spec["nodes"][2]["args"][0] = {"node": last}


def _edit_method(spec):
    node = _node(spec, lambda n: n["op"] == "call_function")
    node.update(op="call_method", target="__class__")


def _edit_missing_layer(spec):
    _node(spec, lambda n: n["op"] == "call_module")["target"] = "no.such.layer"


def _edit_module_path_injection(spec):
    bad = 'stem.0");__import__("os").system("touch MARKER");("'
    spec["modules"][0]["name"] = bad
    _node(spec, lambda n: n["target"] == "stem.0")["target"] = bad


def _edit_keyword_injection(spec):
    node = _node(spec, lambda n: n["op"] == "call_function")
    node["kwargs"] = {"alpha=__import__('pathlib').Path('MARKER').touch() or 1, beta": 1}


def _edit_input_name(spec):
    spec["nodes"][0]["name"] = spec["nodes"][0]["target"] = "torch"
    spec["nodes"][1]["args"][0] = {"node": "torch"}


def _edit_output_not_last(spec):
    spec["nodes"].insert(1, spec["nodes"].pop())


def _edit_unused_module(spec):
    spec["modules"].append({"name": "extra", "type": "ReLU", "args": {}})


def _edit_foreign_argument(spec):
    spec["modules"][0]["args"]["device"] = "meta"


def _edit_class_name(spec):
    spec["class_name"] = "X(): pass\nimport os\nclass Y"


def _edit_nested_layer(spec):
    spec["modules"].append({"name": "stem.0.inner", "type": "ReLU", "args": {}})


CORRUPTIONS = [
    (_edit_unknown_function, r"function 'builtins.eval' is not in the whitelist"),
    (_edit_os_system, r"function 'os.system' is not in the whitelist"),
    (_edit_unknown_module, r"layer type 'Evil'"),
    (_edit_missing_node, r"refers to the unknown node 'no_such_node'"),
    (_edit_forward_reference, r"refers to the unknown node"),
    (_edit_method, r"tensor method '__class__' is not in the whitelist"),
    (_edit_missing_layer, r"calls the unknown layer 'no.such.layer'"),
    (_edit_module_path_injection, r"is not a module path"),
    (_edit_keyword_injection, r"is not a plain identifier"),
    (_edit_input_name, r"reserved name"),
    (_edit_output_not_last, r"output"),
    (_edit_unused_module, r"never uses 'extra'"),
    (_edit_foreign_argument, r"unexpected arguments \['device'\]"),
    (_edit_class_name, r"class name .* is not a plain identifier"),
    (_edit_nested_layer, r"inside the layer 'stem.0'"),
]


@pytest.mark.parametrize("edit, match", CORRUPTIONS, ids=[e.__name__[6:] for e, _ in CORRUPTIONS])
def test_corrupt_graph_in_model_pt_is_refused(small, edit, match, tmp_path, monkeypatch):
    result, _, spec = small
    save_plain(tmp_path / "m.pt", result.model)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    bad = json.loads(json.dumps(spec))
    edit(bad)
    state["graph"] = json.dumps(bad)
    torch.save(state, tmp_path / "bad.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError, match=match):
        load_plain(tmp_path / "bad.pt")
    assert not (tmp_path / "MARKER").exists()


@pytest.fixture(scope="module")
def small_bcz(small) -> bytes:
    return pack(small[0])[0]


def test_assembled_graph_file_loads(small_bcz, small):
    doc, records = _parts(small_bcz)
    assert _assemble(doc, records) == small_bcz
    _same_tensors(small[0].model, unpack(small_bcz)[0])


@pytest.mark.parametrize("edit, match", CORRUPTIONS, ids=[e.__name__[6:] for e, _ in CORRUPTIONS])
def test_corrupt_graph_in_bcz_is_refused(small_bcz, edit, match, tmp_path, monkeypatch):
    doc, records = _parts(small_bcz)
    edit(doc["graph"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PackedFileError, match=match):
        unpack(_assemble(doc, records))
    assert not (tmp_path / "MARKER").exists()


def test_bcz_graph_flag_must_match_the_description(small_bcz):
    doc, records = _parts(small_bcz)
    with pytest.raises(PackedFileError, match="graph flag"):
        unpack(_assemble(doc, records, flags=0))
    doc["spec"] = doc.pop("graph")
    with pytest.raises(PackedFileError, match="graph flag"):
        unpack(_assemble(doc, records))


def test_bcz_absurd_graph_sizes_refused_before_building(small_bcz):
    doc, records = _parts(small_bcz)
    conv = next(m for m in doc["graph"]["modules"] if m["type"] == "Conv2d")
    conv["args"].update(in_channels=10**5, out_channels=10**5)
    with pytest.raises(PackedFileError, match="refusing"):
        unpack(_assemble(doc, records))
    doc, records = _parts(small_bcz)
    doc["graph"]["buffers"].append({"name": "huge", "shape": [10**6, 10**6], "dtype": "float32"})
    with pytest.raises(PackedFileError, match="refusing"):
        unpack(_assemble(doc, records))
    doc, records = _parts(small_bcz)  # the description itself is capped (1 MiB), so is the node count
    doc["graph"]["nodes"] = [{"name": f"n{i}", "op": "placeholder", "target": f"n{i}"} for i in range(40_000)]
    with pytest.raises(PackedFileError, match="larger than 1048576 bytes"):
        unpack(_assemble(doc, records))


def test_fuzzed_graph_descriptions_load_or_raise_packed_file_error(small_bcz):
    """Random edits of the graph description (checksum repaired): each file loads or raises PackedFileError."""
    doc, records = _parts(small_bcz)
    rng = random.Random(7)
    refused = 0
    for i in range(300):
        bad = dict(doc, graph=mutate_json(doc["graph"], rng))
        try:
            unpack(_assemble(bad, records))
        except PackedFileError:
            refused += 1
        except Exception as exc:  # pragma: no cover - the failure this test exists to find
            raise AssertionError(f"mutation {i} raised {type(exc).__name__}: {exc}") from exc
    assert refused > 200


def test_corrupt_model_pt_tensors_are_refused(small, tmp_path):
    result, _, _ = small
    save_plain(tmp_path / "m.pt", result.model)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith(".weight"))
    state["state_dict"][key] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="inconsistent"):
        load_plain(tmp_path / "bad.pt")
    state["version"] = 4
    torch.save(state, tmp_path / "newer.pt")
    with pytest.raises(ModelFileError, match="format version 4"):
        load_plain(tmp_path / "newer.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(ModelFileError, match="cannot read"):
        load_plain(tmp_path / "junk.pt")


def test_build_graph_refuses_wrong_structure():
    for bad in (None, [], {"modules": [], "buffers": [], "nodes": []}, {"modules": {}, "buffers": [], "nodes": []}):
        with pytest.raises(ModelFileError):
            build_graph(bad)


def test_save_is_atomic(small, tmp_path, monkeypatch):
    """A failing write leaves the old file in place and no temporary file behind."""
    result, _, _ = small
    target = tmp_path / "m.pt"
    save_plain(target, result.model)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_plain(target, result.model)
    assert target.read_bytes() == before
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["m.pt"]
