"""Writes the sample model files of tests/data/formats/ with the bayescomp version that is checked out.

Run once per file-format generation; the files are committed, and `tests/test_formats.py` checks that the
current version still loads each of them and computes the outputs recorded beside it. Do not regenerate
the files of an earlier version with a later one: that would test nothing.

    PYTHONPATH=src python tests/data/formats/make_samples.py tests/data/formats/v0.1.0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import bayescomp
from bayescomp.io import save_plain
from bayescomp.io.export import export_safetensors
from bayescomp.models.resnet import resnet_mnist
from bayescomp.nn import GroupSparseLayer


def _posterior(bmodel: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial batch-norm statistics and group scales, so that a folding or decoding error would show."""
    with torch.no_grad():
        for m in bmodel.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if isinstance(m, GroupSparseLayer) and hasattr(m, "z_mu"):  # GNJ; GHS keeps its initial scales
                m.z_mu.copy_(1 + 0.3 * torch.randn(m.n_groups, generator=gen))


def _keeps(bmodel: nn.Module, gen: torch.Generator, p: float) -> dict[str, torch.Tensor]:
    keeps = {}
    for name, m in bmodel.named_modules():
        if isinstance(m, GroupSparseLayer):
            k = torch.rand(m.n_groups, generator=gen) < p
            k[0] = True
            keeps[name] = k
    return keeps


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 10))


def convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 5),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 30), nn.ReLU(),
                         nn.Linear(30, 10))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28, generator=gen)
    index = {"bayescomp_version": bayescomp.__version__, "input": "input.pt", "files": {}}
    torch.save(x, out / "input.pt")
    samples = {"mlp": (mlp(), "gnj", None), "convnet": (convnet(), "ghs", None), "resnet": (resnet_mnist(), "gnj", x)}
    for name, (model, prior, example) in samples.items():
        bmodel = bayescomp.bayesianize(model, prior)
        _posterior(bmodel, gen)
        if example is None:
            thresholds = {n: float(m.log_alpha().detach().quantile(0.5)) for n, m in bmodel.named_modules()
                          if isinstance(m, GroupSparseLayer)}
            result = bayescomp.compress(bmodel, thresholds=thresholds)
        else:
            from bayescomp.compress import graph_compress
            result = graph_compress(bmodel, example_input=example, keeps=_keeps(bmodel, gen, 0.6))
        with torch.no_grad():
            y = result.model.eval()(x)
        torch.save(y, out / f"{name}.out.pt")
        files = {}
        coders = ["huffman", "ans", "auto"] if name == "mlp" else ["auto"]
        for coder in coders:
            f = f"{name}.{coder}.bcz"
            bayescomp.io.packed.save(result, out / f, coder=coder)
            files[f] = "packed"
        save_plain(out / f"{name}.pt", result.model, {"sample": name})
        files[f"{name}.pt"] = "plain"
        if example is None:
            export_safetensors(result.model, out / f"{name}.safetensors", {"sample": name})
            files[f"{name}.safetensors"] = "safetensors"
        index["files"][name] = {"output": f"{name}.out.pt", "files": files}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
