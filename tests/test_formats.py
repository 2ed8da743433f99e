"""Files written by earlier versions still load: every committed sample computes the outputs recorded with it.

The samples under tests/data/formats/<version>/ were written by that version (`make_samples.py` there):
a fully connected chain (packed with Huffman, ANS and the automatic coder), a convolutional chain with
batch norm, and a residual network compressed as a graph, each as a packed .bcz, a plain model file and
(chains) safetensors. A change to a reader, the layer whitelist or the runtime modules a compressed
model uses that breaks an earlier file fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bayescomp.io import load, load_plain
from bayescomp.io.export import load_safetensors

ROOT = Path(__file__).parent / "data" / "formats"
CASES = [(version.name, name, f, kind)
         for version in sorted(p for p in ROOT.iterdir() if p.is_dir())
         for name, entry in json.loads((version / "index.json").read_text())["files"].items()
         for f, kind in entry["files"].items()]


def test_there_are_samples_of_each_kind():
    kinds = {kind for *_, kind in CASES}
    assert kinds == {"packed", "plain", "safetensors"}
    assert any(f.endswith(".huffman.bcz") for _, _, f, _ in CASES)
    assert any(f.startswith("resnet") and kind == "packed" for _, _, f, kind in CASES)


@pytest.mark.parametrize(("version", "name", "filename", "kind"), CASES, ids=[f"{v}/{f}" for v, _, f, _ in CASES])
def test_sample_loads_and_computes_its_outputs(version, name, filename, kind):
    folder = ROOT / version
    x = torch.load(folder / "input.pt", weights_only=True)
    expected = torch.load(folder / f"{name}.out.pt", weights_only=True)
    path = folder / filename
    if kind == "packed":
        model = load(path)
    elif kind == "plain":
        model, meta = load_plain(path)
        assert meta.get("sample") == name
    else:
        model, meta = load_safetensors(path)
        assert meta.get("sample") == name
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == expected.shape
    # packed weights are the rounded ones the model already held; only float summation order may differ
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
