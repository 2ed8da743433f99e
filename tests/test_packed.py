"""Tests for the packed file (.bcz): coders (Huffman, ANS, fixed width), streams, sparse index, format, rates, robustness."""

from __future__ import annotations

import json
import random
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bayescomp
import bayescomp.models
from bayescomp.compress import CompressedModel
from bayescomp.compress.rates import CodedBits, cr_file, cr_max
from bayescomp.data import load_mnist
from bayescomp.io import canonical_huffman, codec, sparse_index, streams
from bayescomp.io.packed import (
    MAGIC,
    PackedFileError,
    coded_bits,
    load,
    pack,
    packed_report,
    save,
    unpack,
)

# ----------------------------------------------------------------------------------------------------------------
# models


def _prune_some(bmodel: nn.Module, seed: int) -> nn.Module:
    """Give about half the groups of every layer a large log-variance, so compress() prunes them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bmodel.modules():
            if hasattr(m, "z_logvar"):
                drop = torch.rand(m.z_logvar.numel(), generator=g) < 0.5
                drop[0] = False  # never all of them
                m.z_logvar[drop] = 5.0
    return bmodel


def _compressed(name: str, seed: int = 0) -> CompressedModel:
    torch.manual_seed(seed)
    bmodel = bayescomp.bayesianize(bayescomp.models.build_model(name))
    return bayescomp.compress(_prune_some(bmodel, seed))


@pytest.fixture(scope="module")
def lenets() -> dict[str, CompressedModel]:
    return {"lenet300": _compressed("lenet300"), "lenet5": _compressed("lenet5")}


@pytest.fixture(scope="module")
def mnist_images() -> torch.Tensor:
    try:
        x, _ = load_mnist("test")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"MNIST not available: {exc}")
    return x[:2000]


def _tiny() -> CompressedModel:
    """A small compressed net with every tensor encoding: sparse conv and linear, Select, batch norm, biases."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)
    )
    bmodel = bayescomp.bayesianize(net)
    with torch.no_grad():
        bmodel[0].z_logvar[1] = 5.0
        bmodel[3].z_logvar[[0, 5, 7, 20]] = 5.0
    return bayescomp.compress(bmodel)


@pytest.fixture(scope="module")
def tiny() -> CompressedModel:
    return _tiny()


@pytest.fixture(scope="module")
def tiny_bytes(tiny: CompressedModel) -> bytes:
    data, info = pack(tiny)
    encodings = {r["encoding"] for r in info["records"]}
    assert encodings == {"sparse", "float32", "int64", "index-set"}
    return data


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize("coder", ["ans", "huffman", "auto"])
def test_round_trip_on_mnist(lenets, mnist_images, tmp_path, name, coder):
    result = lenets[name]
    path = tmp_path / f"{name}.bcz"
    save(result, path, coder=coder)
    loaded = bayescomp.io.packed.load(path)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    assert [type(m) for m in loaded] == [type(m) for m in result.model]
    assert _same_state(loaded, result.model)  # weights restored bit for bit
    with torch.no_grad():
        ours, theirs = result.model(mnist_images), loaded(mnist_images)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    # the file beats dense float32 storage of the pruned network
    report = packed_report(result, path)
    assert report["file_bytes"] == path.stat().st_size
    assert report["cr_file"] > result.report["cr_architecture"]
    assert report["verified"] is True
    assert report["coder"] == coder


def test_coders_compared(lenets, tmp_path):
    """ANS beats Huffman on the LeNet-300 file; auto (smallest per stream) is never worse than either."""
    sizes = {c: len(pack(lenets["lenet300"], c)[0]) for c in ("ans", "huffman", "auto")}
    assert sizes["ans"] < sizes["huffman"]
    assert sizes["auto"] <= min(sizes["ans"], sizes["huffman"])


def test_packed_report_fields(lenets, tmp_path):
    result = lenets["lenet5"]
    path = tmp_path / "m.bcz"
    save(result, path)
    rep = packed_report(result, path)
    for key in ("cr_max", "file_bytes", "cr_file", "entropy_bits", "coder", "huffman_bits", "layers"):
        assert key in rep
    assert json.loads(json.dumps(rep)) == rep  # plain JSON values, ready for report.json
    assert rep["cr_max"] == pytest.approx(32 * rep["weights_total"] / rep["max_bits"])
    assert rep["cr_file"] == pytest.approx(32 * rep["weights_total"] / (8 * rep["file_bytes"]))
    assert (
        rep["entropy_bits"]
        <= rep["huffman_bits"]
        < rep["entropy_bits"] + sum(2 * (layer["nonzeros"] + layer["fillers"]) for layer in rep["layers"])
    )
    # every quantised layer is reported with Han's index widths: 8 bits for convolutions, 5 for linear
    assert {layer["layer"]: layer["index_bits"] for layer in rep["layers"]} == {
        "conv1": 8,
        "conv2": 8,
        "fc1": 5,
        "fc2": 5,
    }


def test_load_leaves_rng_alone(tiny_bytes):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    unpack(tiny_bytes)
    assert torch.equal(before, torch.get_rng_state())


def test_save_is_atomic_and_refuses_unrounded_weights(tiny, tmp_path):
    path = tmp_path / "t.bcz"
    save(tiny, path)
    good = path.read_bytes()
    broken = CompressedModel(
        model=nn.Sequential(nn.Linear(3, 2)), report={}, masks={}, bits={"0": 4}
    )  # random weights: not multiples of 2^-4
    with pytest.raises(ValueError, match="multiples"):
        save(broken, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bcz"]  # no temp file left behind


def test_unquantised_layers_stored_as_float(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.round(model[0].weight * 8) / 8)
    cm = CompressedModel(model=model, report={}, masks={}, bits={"0": 3})  # layer "2" has no bits
    data, info = pack(cm)
    assert [r["encoding"] for r in info["records"]] == ["sparse", "float32", "float32", "float32"]
    assert _same_state(unpack(data)[0], model)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv"]),
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 12),
    bits=st.integers(1, 23),
    sparsity=st.floats(0.0, 1.0),
    coder=st.sampled_from(["ans", "huffman", "auto"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_round_trip_random_layers(kind, out_f, in_f, bits, sparsity, coder, seed):
    rng = np.random.default_rng(seed)
    layer = nn.Linear(in_f, out_f) if kind == "linear" else nn.Conv2d(in_f, out_f, 3)
    shape = tuple(layer.weight.shape)
    q = np.rint(rng.normal(0, 0.2, shape) * 2.0**bits)
    q[rng.random(shape) < sparsity] = 0
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(q * 2.0**-bits))
    cm = CompressedModel(model=nn.Sequential(layer), report={}, masks={}, bits={"0": bits})
    loaded, _ = unpack(pack(cm, coder)[0])
    assert _same_state(loaded, cm.model)


# ----------------------------------------------------------------------------------------------------------------
# codec


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 30),
    cols=st.integers(1, 60),
    sparsity=st.floats(0.0, 1.0),
    bits=st.integers(1, 23),
    scale=st.floats(1e-3, 1.0),
    index_bits=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_codec_round_trip(rows, cols, sparsity, bits, scale, index_bits, seed):
    rng = np.random.default_rng(seed)
    q = np.rint(rng.laplace(0, scale, (rows, cols)) * 2.0**bits).astype(np.int64)
    q = np.clip(q, 1 - 2**24, 2**24 - 1)  # float32 holds q·2^-bits exactly below 2^24
    q[rng.random((rows, cols)) < sparsity] = 0
    w = (q * 2.0**-bits).astype(np.float32)
    assert np.array_equal(sparse_index.quantize(w, bits), q)
    values, gaps = sparse_index.sparse_encode(q, index_bits)
    assert np.array_equal(sparse_index.sparse_decode(values, gaps, q.size, index_bits), q.reshape(-1))
    assert gaps.size == 0 or gaps.max() < 2**index_bits
    for symbols in (values, gaps):
        for coder in ("ans", "huffman", "fixed", "auto"):
            s = streams.encode_stream(symbols, coder)
            assert np.array_equal(streams.decode_stream(s.coder, s.table, s.payload, s.n), symbols)
        if symbols.size == 0:
            continue
        _, counts = np.unique(symbols, return_counts=True)
        codec.check_code_lengths(codec.huffman_code_lengths(counts))  # a complete prefix code
        n, h = symbols.size, codec.entropy_bits(symbols)
        hb = codec.huffman_bits(symbols)
        assert h - 1e-6 <= hb < h + n  # H·n ≤ Huffman bits < (H + 1)·n


def _canonical_payload(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """What 0.1.0 wrote: the canonical code words of `symbols`, MSB first, zero-padded to a byte (a reference)."""
    codes = canonical_huffman.canonical_codes(lengths)
    bits = "".join(format(codes[s], f"0{int(lengths[s])}b") for s in symbols.tolist())
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""


def test_canonical_codes_of_0_1_0():
    lengths = np.array([3, 1, 3, 3, 4, 4])  # Kraft sum exactly 1
    words = [format(c, f"0{n}b") for c, n in zip(canonical_huffman.canonical_codes(lengths), lengths, strict=True)]
    assert words == ["100", "0", "101", "110", "1110", "1111"]  # shorter first, ties in symbol order
    symbols = np.array([1, 0, 5, 1, 3, 4, 2, 1])
    payload = _canonical_payload(symbols, lengths)
    assert payload == bytes([0b01001111, 0b01101110, 0b10100000])  # 0 100 1111 0 110 1110 101 0, then 0000
    assert np.array_equal(canonical_huffman.decode(payload, lengths, symbols.size), symbols)
    for bad in (payload + b"\0", payload[:-1]):  # a byte too many, a code word cut off
        with pytest.raises(codec.CodecError):
            canonical_huffman.decode(bad, lengths, symbols.size)
    with pytest.raises(codec.CodecError, match="Kraft"):
        canonical_huffman.decode(payload, np.array([1, 1, 2]), 3)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 3000), min_size=2, max_size=2000), seed=st.integers(0, 2**31 - 1))
def test_canonical_huffman_of_0_1_0_decodes_what_it_wrote(counts, seed):
    lengths = codec.huffman_code_lengths(np.array(counts))
    if lengths.max() > canonical_huffman.MAX_LENGTH:
        return  # 0.1.0 limited its codes to 24 bits
    symbols = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    payload = _canonical_payload(symbols, lengths)
    assert np.array_equal(canonical_huffman.decode(payload, lengths, symbols.size), symbols)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 500), min_size=1, max_size=300), seed=st.integers(0, 2**31 - 1))
def test_huffman_stream_costs_its_code_lengths_and_round_trips(counts, seed):
    values = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)) * 3 - 7, counts))
    s = streams.encode_stream(values, "huffman")
    assert s.payload_bits == codec.huffman_bits(values)
    assert len(s.payload) == (s.payload_bits + 7) // 8  # whole bytes, not constriction's 32-bit words
    assert np.array_equal(streams.decode_stream(s.coder, s.table, s.payload, s.n), values)
    if s.payload:
        for bad in (s.payload + b"\0", s.payload[:-1]):
            with pytest.raises(codec.CodecError):
                streams.decode_stream(s.coder, s.table, bad, s.n)


def test_huffman_deeper_than_its_length_field_is_refused_and_auto_codes_it_otherwise(monkeypatch):
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    assert codec.huffman_code_lengths(np.array(fib)).max() == 39  # a Fibonacci source makes the deepest tree
    # a 39-bit code needs 10^8 symbols; the same refusal, with a 12-symbol source against a field of 8 bits:
    monkeypatch.setattr(streams, "MAX_CODE_LENGTH", 8)
    symbols = np.repeat(np.arange(12), fib[:12])  # its tree is 11 deep
    with pytest.raises(ValueError, match="needs codes of 11 bits .* use 'ans'"):
        streams.encode_stream(symbols, "huffman")
    s = streams.encode_stream(symbols, "auto")
    assert s.coder_name in ("ans", "fixed")
    assert np.array_equal(streams.decode_stream(s.coder, s.table, s.payload, s.n), symbols)


def test_single_symbol_alphabet_costs_nothing():
    symbols = np.full(1000, -7, dtype=np.int64)
    assert list(codec.huffman_code_lengths(np.array([1000]))) == [0]
    for coder in ("ans", "huffman", "fixed"):
        s = streams.encode_stream(symbols, coder)
        assert s.payload == b""
        assert np.array_equal(streams.decode_stream(s.coder, s.table, s.payload, s.n), symbols)


def test_ans_near_entropy_and_beats_huffman_on_skewed_source():
    rng = np.random.default_rng(0)
    symbols = (rng.random(50_000) < 0.05).astype(np.int64)  # H ≈ 0.29 bit, Huffman needs 1 bit
    h = codec.entropy_bits(symbols)
    ans = streams.encode_stream(symbols, "ans")
    assert ans.payload_bits <= 1.01 * h + 64
    assert codec.huffman_bits(symbols) == symbols.size
    assert ans.payload_bits < 0.35 * codec.huffman_bits(symbols)


def test_quantize_refuses_unrounded_weights():
    with pytest.raises(ValueError, match="multiples of 2"):
        sparse_index.quantize(np.array([0.5, 0.3]), 3)
    assert list(sparse_index.quantize(np.array([0.5, -0.375, 0.0]), 3)) == [4, -3, 0]


# ----------------------------------------------------------------------------------------------------------------
# Deep Compression sparse index


def test_filler_entries_hand_example():
    # 2 index bits: a gap holds 0..3 skipped zeros
    q = np.zeros(21, dtype=np.int64)
    q[[5, 7, 20]] = [5, 7, 3]
    values, gaps = sparse_index.sparse_encode(q, 2)
    # position 5: 5 zeros skipped > 3 -> one filler (zero at position 3), then 5 after 1 zero;
    # position 7: 1 zero skipped; position 20: 12 zeros skipped -> fillers at 11, 15, 19, then 3 after 0 zeros
    assert values.tolist() == [0, 5, 7, 0, 0, 0, 3]
    assert gaps.tolist() == [3, 1, 1, 3, 3, 3, 0]
    assert sparse_index.sparse_decode(values, gaps, 21, 2).tolist() == q.tolist()
    # exactly at the boundary: 3 skipped zeros fit, 4 do not
    at = np.array([0, 0, 0, 1])
    assert [a.tolist() for a in sparse_index.sparse_encode(at, 2)] == [[1], [3]]
    over = np.array([0, 0, 0, 0, 1])
    assert [a.tolist() for a in sparse_index.sparse_encode(over, 2)] == [[0, 1], [3, 0]]
    assert sparse_index.default_index_bits(2) == 5 and sparse_index.default_index_bits(4) == 8


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=300), st.integers(1, 6))
def test_fillers_appear_exactly_when_gaps_overflow(pattern, index_bits):
    q = np.array([v if v == 3 else 0 for v in pattern], dtype=np.int64)  # sparse, mostly zero
    values, gaps = sparse_index.sparse_encode(q, index_bits)
    pos = np.flatnonzero(q)
    skips = np.diff(pos, prepend=-1) - 1
    assert values.size - pos.size == int(np.sum(skips // 2**index_bits))
    assert np.count_nonzero(values) == pos.size


# ----------------------------------------------------------------------------------------------------------------
# rates


def test_cr_max_hand_check():
    # layer "0": q = [[1,0,0,0],[0,-1,0,3]] at 1 bit -> values [1,-1,3], gaps [0,4,1] (index bits 5)
    # each stream: 3 distinct symbols once each -> Huffman lengths {1,2,2} = 5 bits; layer "1" stays float (2·32)
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 3]]) / 2)
    cm = CompressedModel(model=model, report={"weights_total": 10}, masks={}, bits={"0": 1})
    bits = coded_bits(cm)
    assert bits == [CodedBits("0", 5, 5), CodedBits("1", 64, 0)]
    assert cr_max(10, bits) == pytest.approx(320 / 74)
    assert cr_file(100, 50) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        cr_max(0, bits)


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _parts(data: bytes) -> tuple[bytes, bytes]:
    """(spec blob, the records) of a valid file."""
    (spec_len,) = struct.unpack_from("<I", data, 20)
    return data[24 : 24 + spec_len], data[24 + spec_len : -4]


def _assemble(spec: bytes, records: bytes, version: int = 1, flags: int = 0) -> bytes:
    total = 20 + 4 + len(spec) + len(records) + 4
    out = struct.pack("<8sHHQ", MAGIC, version, flags, total) + struct.pack("<I", len(spec)) + spec + records
    return out + struct.pack("<I", zlib.crc32(out))


def _fix(data: bytes) -> bytes:
    """The same bytes with the length field and checksum made consistent again."""
    if len(data) < 24:
        return data
    body = bytearray(data[:-4])
    body[12:20] = struct.pack("<Q", len(data))
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def test_assemble_reproduces_the_file(tiny_bytes):
    assert _assemble(*_parts(tiny_bytes)) == tiny_bytes


def test_every_truncation_is_refused(tiny_bytes):
    for n in range(len(tiny_bytes)):
        with pytest.raises(PackedFileError):
            unpack(tiny_bytes[:n])
    with pytest.raises(PackedFileError, match="truncated"):
        unpack(tiny_bytes[:-10])


def test_every_single_bit_flip_is_refused(tiny_bytes):
    data = bytearray(tiny_bytes)
    for i in range(8 * len(data)):
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(PackedFileError):
            unpack(bytes(data))
        data[i // 8] ^= 1 << (i % 8)
    assert bytes(data) == tiny_bytes


def test_wrong_magic_future_version_unknown_flags(tiny_bytes, tmp_path):
    with pytest.raises(PackedFileError, match="magic"):
        unpack(b"PK\x03\x04" + tiny_bytes[4:])
    with pytest.raises(PackedFileError, match="magic"):
        unpack(b"hello")
    with pytest.raises(PackedFileError, match="version 2 is newer"):
        unpack(_assemble(*_parts(tiny_bytes), version=2))
    with pytest.raises(PackedFileError, match="flags"):
        unpack(_assemble(*_parts(tiny_bytes), flags=4))
    with pytest.raises(PackedFileError, match="checksum"):
        unpack(tiny_bytes[:-1] + bytes([tiny_bytes[-1] ^ 0xFF]))
    with pytest.raises(PackedFileError, match="not found"):
        load(tmp_path / "missing.bcz")
    (tmp_path / "empty.bcz").write_bytes(b"")
    with pytest.raises(PackedFileError, match="empty.bcz"):
        load(tmp_path / "empty.bcz")


def _with_spec(data: bytes, edit) -> bytes:
    spec, records = _parts(data)
    doc = json.loads(zlib.decompress(spec))
    edit(doc["spec"])
    return _assemble(zlib.compress(json.dumps(doc).encode()), records)


def _layer(spec, kind):
    return next(e for e in spec if e["type"] == kind)


def test_absurd_sizes_refused_without_allocating(tiny_bytes):
    def huge_linear(spec):
        _layer(spec, "Linear")["args"].update(in_features=10**6, out_features=10**6)  # 10^12 weights

    def huge_conv(spec):
        _layer(spec, "Conv2d")["args"].update(out_channels=10**5, in_channels=10**5)

    def foreign_arg(spec):
        _layer(spec, "Linear")["args"]["device"] = "meta"

    for edit, message in ((huge_linear, "refusing"), (huge_conv, "refusing"), (foreign_arg, "unexpected")):
        bad = _with_spec(tiny_bytes, edit)
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(PackedFileError, match=message):
            unpack(bad)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 50 * 2**20 and elapsed < 1.0
    with pytest.raises(PackedFileError, match="refusing"):
        unpack(tiny_bytes, max_elements=100)


def test_absurd_counts_in_records_refused(tiny_bytes):
    spec, records = _parts(tiny_bytes)
    name = b"3.weight"
    at = records.index(struct.pack("<H", len(name)) + name) + 2 + len(name)
    assert records[at] == 3 and records[at + 1] == 2  # sparse, 2-D
    entries_at = at + 2 + 8 + 2
    stream_at = entries_at + 4
    cases = {
        "sparse entries": (entries_at, struct.pack("<I", 0xFFFFFFFF)),
        "needs 4294967295 bytes": (stream_at + 1, struct.pack("<I", 0xFFFFFFFF)),  # table length
        "shape": (at + 2, struct.pack("<I", 10**9)),
        "unknown coder": (stream_at, b"\x07"),
    }
    for message, (offset, patch) in cases.items():
        bad = records[:offset] + patch + records[offset + len(patch) :]
        tracemalloc.start()
        with pytest.raises(PackedFileError, match=message):
            unpack(_assemble(spec, bad))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 50 * 2**20


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(5)
        i = rng.randrange(len(out) + 1) if out else 0
        if op == 0 and out:  # flip one byte
            i = min(i, len(out) - 1)
            out[i] ^= rng.randrange(1, 256)
        elif op == 1:  # insert
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 2:  # delete
            del out[i : i + rng.randrange(1, 9)]
        elif op == 3:  # truncate
            del out[i:]
        else:  # overwrite with a boundary value
            out[i : i + 4] = rng.choice((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f"))
    return bytes(out)


def test_fuzz_mutated_files_load_or_raise_packed_file_error(tiny):
    """10,000 mutated files (written with each coder in turn): half as they are (the checksum catches
    them), half with length and checksum repaired so that the parser itself meets the damage. Each
    one loads or raises PackedFileError, nothing else."""
    files = [pack(tiny, coder)[0] for coder in ("auto", "ans", "huffman")]
    rng = random.Random(20240601)
    refused = 0
    for i in range(10_000):
        bad = _mutate(files[i % 3], rng)
        if i % 2:
            bad = _fix(bad)
        try:
            model, _ = unpack(bad)
        except PackedFileError:
            refused += 1
        except Exception as exc:  # pragma: no cover - the failure this test exists to find
            raise AssertionError(f"mutation {i} raised {type(exc).__name__}: {exc}") from exc
        else:
            assert isinstance(model, nn.Sequential)
    assert refused > 9_000
