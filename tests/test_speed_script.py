"""benchmarks/speed.py refuses a bad --run before any timing, and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("run", "message"), [("lenet300={missing}", "no model.pt there"),
                                              ("lenet300", "--run takes model=RUN_DIR")])
def test_bad_run_is_refused_before_timing(tmp_path, run, message):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--run",
                           run.format(missing=tmp_path / "no_run"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert "training steps" not in proc.stdout and not out.exists()


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_the_timed_networks_are_pruned_to_the_papers_architecture(monkeypatch, model, prior):
    # the fine-tuning step and the inference timings stand for the paper's widths (`_paper_pruned`)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import speed

    from bayescomp.compress import group_masks
    kept = {name: int(k.sum()) for name, k in group_masks(speed._paper_pruned(model, prior)).items()}
    assert kept == speed.PAPER_ARCH[model]
