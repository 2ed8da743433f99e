"""Saving compressed token models: the ViT of benchmarks/transformer.py and an Embedding classifier.

The property: a compressed token model (LayerNorm, nn.Embedding, the `AttentionHeads` left after heads were cut, a
position embedding held as a buffer, reshapes to computed shapes, slices) goes into the packed .bcz file and the
plain model file and comes back with the same tensors, computing the same outputs; the files are marked (packed flag
bit 1, model-file version 3) so that a reader from before refuses them by that mark; a tampered description is
refused with PackedFileError / ModelFileError naming the problem; the packed file is smaller than the float32
state_dict.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import bcz_assemble, bcz_parts, mutate_json
from torch import fx, nn

import bayescomp
from bayescomp.io import packed_reader, plain
from bayescomp.io.packed import FLAG_GRAPH, FLAG_TOKENS, PackedFileError, pack, unpack
from bayescomp.io.plain import ModelFileError, load_plain, save_plain, token_entries

pytestmark = pytest.mark.usefixtures("one_thread")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _median_cut(bmodel: nn.Module, suffixes: tuple[str, ...]) -> dict[str, float]:
    """Thresholds at the median log α of the layers named with these suffixes: about half their groups go."""
    return {name: float(m.log_alpha().detach().median()) for name, m in bmodel.named_modules()
            if name.endswith(suffixes)}


@pytest.fixture(scope="module")
def vit():
    """The benchmark's ViT (8 heads), random-init, GNJ, with about half the heads and MLP neurons cut; rounded."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        from transformer import ViT
    torch.manual_seed(0)
    bmodel = bayescomp.bayesianize(ViT(heads=8), prior="gnj", keep_weights=True).eval()
    cut = _median_cut(bmodel, ("attn.out_proj", "mlp.fc2"))
    return bayescomp.compress(bmodel, thresholds=cut, example_input=torch.randn(2, 1, 28, 28), round_weights=True)


class TokenClassifier(nn.Module):
    """Token ids → Embedding → Linear/GELU/Linear on (batch, tokens, features) → token reductions → classes.

    The shape reads (``h.shape[1]``, ``t.size(1) // n``, ``t.dim()``) and slices (``y[:, :k]``, ``y[..., 0:1]``)
    become size arithmetic, `full_shape` (h loses features) and slice arguments in the compressed graph."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 24, padding_idx=0)
        self.fc1, self.fc2, self.head = nn.Linear(24, 48), nn.Linear(48, 24), nn.Linear(24, 5)

    def forward(self, t):
        h = F.gelu(self.fc1(self.emb(t)))
        n = h.shape[1]
        y = self.fc2(h)
        first = y[:, : t.size(1) // n]
        return self.head(first.sum(1) + y.mean(1) + y[..., 0:1].mean(1) / t.dim())


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    bmodel = bayescomp.bayesianize(TokenClassifier(), prior="gnj").eval()
    cut = _median_cut(bmodel, ("fc1", "fc2", "head"))
    return bayescomp.compress(bmodel, thresholds=cut, example_input=torch.randint(0, 50, (3, 7)))


def _vit_input() -> torch.Tensor:
    return torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # another batch size


def _token_input() -> torch.Tensor:
    return torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(4))  # more tokens than the example


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() <= 1e-5


def test_vit_bcz_round_trip(vit, tmp_path):
    model = vit.model
    attentions = [model.get_submodule(f"blocks.{i}.attn") for i in range(2)]
    assert all(0 < a.num_heads < 8 for a in attentions)  # the cut removed heads, and kept some
    assert all(model.get_submodule(f"blocks.{i}.mlp.fc1").out_features < 128 for i in range(2))
    info = bayescomp.save(vit, tmp_path / "vit.bcz")
    loaded = bayescomp.load(tmp_path / "vit.bcz")
    assert isinstance(loaded, fx.GraphModule) and not loaded.training
    _assert_same(model, loaded, _vit_input())
    for i, attn in enumerate(attentions):
        back = loaded.get_submodule(f"blocks.{i}.attn")
        assert (back.num_heads, back.heads.tolist(), back.total_heads) == (attn.num_heads, attn.heads.tolist(), 8)
    assert "_param_add_in1" in dict(loaded.named_buffers())  # the position embedding, a constant of the graph
    # rounded weights stored sparse and coded: smaller than the float32 state_dict, raw or as torch.save writes it
    raw = io.BytesIO()
    torch.save(model.state_dict(), raw)
    assert info["file_bytes"] < 4 * sum(t.numel() for t in model.state_dict().values()) < len(raw.getvalue())


def test_vit_model_file_round_trip(vit, tmp_path):
    save_plain(tmp_path / "vit.pt", vit.model, {"architecture": "vit"})
    assert torch.load(tmp_path / "vit.pt", weights_only=True)["version"] == plain.TOKEN_VERSION == 3
    loaded, meta = load_plain(tmp_path / "vit.pt")
    assert meta == {"architecture": "vit"}
    _assert_same(vit.model, loaded, _vit_input())


def test_token_classifier_round_trips(tokens, tmp_path):
    model = tokens.model
    assert model.emb.embedding_dim < 24  # the Embedding lost the feature columns fc1 no longer reads
    used = set(token_entries(plain.graph_spec(model)))
    assert {"Embedding", "bayescomp.full_shape", "operator.floordiv", "size", "dim", "slice", "ellipsis"} <= used
    bayescomp.save(tokens, tmp_path / "tok.bcz")
    _assert_same(model, bayescomp.load(tmp_path / "tok.bcz"), _token_input())
    save_plain(tmp_path / "tok.pt", model)
    loaded, _ = load_plain(tmp_path / "tok.pt")
    _assert_same(model, loaded, _token_input())
    assert loaded.emb.padding_idx == 0


# ---- the marks: older readers refuse, files without token entries keep theirs --------------------------------


def test_older_readers_refuse_token_files_by_their_mark(vit, tmp_path, monkeypatch):
    data, _ = pack(vit)
    assert int.from_bytes(data[10:12], "little") == FLAG_GRAPH | FLAG_TOKENS
    save_plain(tmp_path / "vit.pt", vit.model)
    monkeypatch.setattr(packed_reader, "KNOWN_FLAGS", FLAG_GRAPH)  # what a bayescomp from before token files does
    with pytest.raises(PackedFileError, match=r"features this bayescomp does not know \(flags 0x0003\)"):
        unpack(data)
    monkeypatch.setattr(plain, "VERSIONS", (1, 2))
    with pytest.raises(ModelFileError, match="format version 3; this bayescomp reads 1, 2"):
        load_plain(tmp_path / "vit.pt")


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def test_a_graph_without_token_entries_is_written_as_before(tmp_path):
    gm = fx.symbolic_trace(_Residual())
    data, _ = pack(gm)
    assert int.from_bytes(data[10:12], "little") == FLAG_GRAPH
    save_plain(tmp_path / "m.pt", gm)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["version"] == plain.GRAPH_VERSION
    doc, records = bcz_parts(data)
    with pytest.raises(PackedFileError, match=r"token flag \(0x0002\) is set but"):
        unpack(bcz_assemble(doc, records, FLAG_GRAPH | FLAG_TOKENS))


def test_a_chain_with_layer_norm_is_flagged_and_round_trips(tmp_path):
    """A chain (nn.Sequential) that holds a token-model layer: token flag without the graph flag, version 3 with a
    layer list."""
    torch.manual_seed(2)
    bmodel = bayescomp.bayesianize(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)))
    result = bayescomp.compress(bmodel.eval(), thresholds=_median_cut(bmodel, ("3",)), example_input=torch.randn(2, 8))
    assert isinstance(result.model, nn.Sequential) and result.model[-1].in_features < 16
    data, _ = pack(result)
    assert int.from_bytes(data[10:12], "little") == FLAG_TOKENS
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    _assert_same(result.model, unpack(data)[0], x)
    save_plain(tmp_path / "chain.pt", result.model)
    state = torch.load(tmp_path / "chain.pt", weights_only=True)
    assert state["version"] == 3 and "spec" in state and "graph" not in state
    _assert_same(result.model, load_plain(tmp_path / "chain.pt")[0], x)


# ---- tampered descriptions ------------------------------------------------------------------------------------


def _first(graph: dict, kind: str, key: str = "type") -> dict:
    items = graph["modules"] if key == "type" else graph["nodes"]
    return next(e for e in items if e.get(key) == kind)


def _edit_unknown_layer(g):
    _first(g, "LayerNorm")["type"] = "LayerNormal"


def _edit_unknown_function(g):
    _first(g, "getattr", "target")["target"] = "builtins.eval"


def _edit_getattr_other_attribute(g):
    _first(g, "getattr", "target")["args"][1] = "__class__"


def _edit_attention_argument(g):
    _first(g, "AttentionHeads")["args"]["device"] = "meta"


def _edit_attention_bias(g):
    _first(g, "AttentionHeads")["args"]["bias"] = [True]


def _edit_slice_bound(g):
    _first(g, "permute", "target")["args"].append({"slice": [0, [1], None]})


def _edit_unknown_tag(g):
    _first(g, "permute", "target")["args"].append({"lambda": "x"})


def _edit_method(g):
    _first(g, "permute", "target")["target"] = "__setattr__"


TAMPERED = [
    (_edit_unknown_layer, r"layer type 'LayerNormal'"),
    (_edit_unknown_function, r"function 'builtins.eval' is not in the whitelist"),
    (_edit_getattr_other_attribute, r"getattr may only read ndim, shape of a value, not '__class__'"),
    (_edit_attention_argument, r"unexpected arguments \['device'\]"),
    (_edit_attention_bias, r"layer 'blocks.0.attn' \(AttentionHeads\): bias must be a bool or 4 bools"),
    (_edit_slice_bound, r"a slice is \[start, stop, step\], each null, an integer or a node"),
    (_edit_unknown_tag, r"invalid argument"),
    (_edit_method, r"tensor method '__setattr__' is not in the whitelist"),
]


@pytest.mark.parametrize("edit, match", TAMPERED, ids=[e.__name__[6:] for e, _ in TAMPERED])
def test_tampered_token_graph_is_refused(vit, edit, match, tmp_path):
    doc, records = bcz_parts(pack(vit)[0])
    edit(doc["graph"])
    with pytest.raises(PackedFileError, match=match):
        unpack(bcz_assemble(doc, records, FLAG_GRAPH | FLAG_TOKENS))
    save_plain(tmp_path / "vit.pt", vit.model)
    state = torch.load(tmp_path / "vit.pt", weights_only=True)
    graph = json.loads(state["graph"])
    edit(graph)
    state["graph"] = json.dumps(graph)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=match):
        load_plain(tmp_path / "bad.pt")


def test_marks_must_match_the_architecture(vit, tmp_path):
    doc, records = bcz_parts(pack(vit)[0])
    with pytest.raises(PackedFileError, match=r"uses AttentionHeads, .*LayerNorm.* token flag \(0x0002\) is not set"):
        unpack(bcz_assemble(doc, records, FLAG_GRAPH))
    save_plain(tmp_path / "vit.pt", vit.model)
    state = torch.load(tmp_path / "vit.pt", weights_only=True)
    state["version"] = plain.GRAPH_VERSION
    torch.save(state, tmp_path / "v2.pt")
    with pytest.raises(ModelFileError, match=r"format version 2 does not match its architecture, which uses "
                                             r"AttentionHeads.* \(version 3\)"):
        load_plain(tmp_path / "v2.pt")


def test_absurd_token_layer_sizes_are_refused_before_building(vit):
    doc, records = bcz_parts(pack(vit)[0])
    _first(doc["graph"], "AttentionHeads")["args"].update(embed_dim=10**6, num_heads=10**3, head_dim=10**3)
    with pytest.raises(PackedFileError, match="refusing"):
        unpack(bcz_assemble(doc, records, FLAG_GRAPH | FLAG_TOKENS))
    doc, records = bcz_parts(pack(vit)[0])
    _first(doc["graph"], "LayerNorm")["args"]["normalized_shape"] = [10**5, 10**5]
    with pytest.raises(PackedFileError, match="refusing"):
        unpack(bcz_assemble(doc, records, FLAG_GRAPH | FLAG_TOKENS))


def test_fuzzed_token_graphs_load_or_raise_packed_file_error(tokens):
    """Random edits of the description (checksum and flag kept valid): each file loads or raises PackedFileError."""
    doc, records = bcz_parts(pack(tokens)[0])
    rng = random.Random(11)
    refused = 0
    for i in range(200):
        bad = dict(doc, graph=mutate_json(doc["graph"], rng))
        flags = FLAG_GRAPH | (FLAG_TOKENS if token_entries(bad["graph"]) else 0)
        try:
            unpack(bcz_assemble(bad, records, flags))
        except PackedFileError:
            refused += 1
        except Exception as exc:  # pragma: no cover - the failure this test exists to find
            raise AssertionError(f"mutation {i} raised {type(exc).__name__}: {exc}") from exc
    assert refused > 120


def test_writer_refuses_getattr_of_anything_but_a_shape(tmp_path):
    class Transposes(nn.Module):
        def forward(self, x):
            return x.T  # traced as getattr(x, "T")

    gm = fx.symbolic_trace(Transposes())
    with pytest.raises(ModelFileError, match=r"getattr may only read ndim, shape of a value, not 'T'"):
        save_plain(tmp_path / "m.pt", gm)
    assert not (tmp_path / "m.pt").exists()


def test_vit_safetensors_export_round_trip(vit, tmp_path):
    """The safetensors export stores the architecture as the model file does (version 3 here) and reads it back."""
    pytest.importorskip("safetensors")
    from bayescomp.io.export import export_safetensors, load_safetensors

    path = export_safetensors(vit.model, tmp_path / "vit.safetensors")
    loaded, _ = load_safetensors(path)
    _assert_same(vit.model, loaded, _vit_input())
