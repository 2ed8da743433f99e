"""Fuzz: report.json and options.json mutated at random (seeded), each through the commands that read them.

Whatever the mutation, a command either works or refuses in one line (exit 1, "error: ..."): never a
traceback, and it writes nothing outside the run's own folder and its --out. One small real run (and one
interrupted run) is made per session; each case works on a copy. The commands run in-process (click's
CliRunner) on a small slice of MNIST (`load_data` is narrowed to it), so that hundreds of cases stay fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import interrupted_run

from bayescomp import pipeline, sweep
from bayescomp.cli import main
from bayescomp.data import load_mnist
from bayescomp.report import plots

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")

POOL: list[Any] = [None, True, False, 0, -1, 1, 7, 2.5, -0.5, 1e308, -1e308, float("nan"), float("inf"), 2**70, "",
                   "x", "lenet5", "ghs", "code", "-3", [], [None], [1, 2], [{"name": "fc1"}], {}, {"a": 1},
                   {"epoch": 1}]


def _paths(doc: Any, rng: random.Random) -> list[Any]:
    """A random path into `doc`: a top-level key first (all equally likely), then deeper with probability ½."""
    path: list[Any] = []
    node = doc
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.5):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    return path


def _retyped(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return rng.choice([str(value), [value], None, -value if math.isfinite(value) else 0])
    if isinstance(value, str):
        return rng.choice([len(value), [value], {value: 1}, value + "x"])
    if isinstance(value, list):
        return rng.choice([{str(i): v for i, v in enumerate(value)}, value * 2, value[:-1], list(reversed(value))])
    if isinstance(value, dict):
        return rng.choice([list(value.values()), list(value), {**value, "unknown": rng.choice(POOL)}])
    return rng.choice(POOL)


def mutate(text: str, rng: random.Random) -> str:
    """One random change of a JSON document's text: a value replaced, retyped, removed, a key added, the text
    truncated, or the whole document replaced."""
    kind = rng.choices(["replace", "retype", "delete", "add", "truncate", "root"], [5, 4, 3, 2, 1, 1])[0]
    if kind == "truncate":
        return text[: rng.randrange(len(text))]
    doc = json.loads(text)
    if kind == "root":
        return json.dumps(rng.choice(POOL))
    doc = copy.deepcopy(doc)
    path = _paths(doc, rng)
    if not path:
        return json.dumps(rng.choice(POOL))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if kind == "replace":
        parent[key] = rng.choice(POOL)
    elif kind == "retype":
        parent[key] = _retyped(parent[key], rng)
    elif kind == "delete":
        del parent[key]
    else:
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[rng.choice(["extra", "model", "epochs", "name", "value", "fc1"])] = rng.choice(POOL)
        else:
            target.append(rng.choice(POOL))
    return json.dumps(doc)


@pytest.fixture(scope="module")
def small_data():
    """`load_data` narrowed to 64 training and 100 test images of MNIST, for every command in this module; and
    the report's figures drawn but not rendered to PNG (an empty file stands for each: rendering is slow)."""
    x, y = load_mnist("train", DATA)
    xt, yt = load_mnist("test", DATA)
    train, test = (x[:64], y[:64]), (xt[:100], yt[:100])

    def load_data(model, data_dir, train_subset=None, seed=0, verify=True):
        return train, test

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "load_data", load_data)
        m.setattr(sweep, "load_data", load_data)
        m.setattr(plots, "_save", _unrendered)
        yield


def _unrendered(fig, path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data) -> dict[str, Path]:
    """A finished run and an interrupted one (1 epoch, 64 images each)."""
    root = tmp_path_factory.mktemp("fuzz")
    opts = pipeline.RunOptions(model="lenet300", epochs=1, train_subset=64, data_dir=DATA)
    pipeline.run(opts, root / "finished", progress=False)
    with pytest.MonkeyPatch.context() as m:
        interrupted_run(opts, root / "unfinished", m)
    return {"finished": root / "finished", "unfinished": root / "unfinished.partial"}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(source: Path, target: Path) -> None:
    """A copy of a run folder; the large tensor files are hard links (every writer replaces files, atomically)."""
    target.mkdir()
    for p in source.iterdir():
        if p.suffix in (".pt", ".bcz"):
            os.link(p, target / p.name)
        else:
            shutil.copy2(p, target / p.name)


#: command words per reading command; RUN: the run folder, OUT: the command's own output folder
REPORT_COMMANDS = {
    "show": (["show", "RUN"], 100),
    "evaluate": (["evaluate", "RUN"], 80),
    "pack": (["pack", "RUN"], 48),
    "export": (["export", "RUN", "--format", "safetensors"], 64),
    "threshold-sweep": (["threshold-sweep", "RUN", "--values", "-3"], 96),
    "prune": (["prune", "RUN", "--out", "OUT"], 48),
    "finetune": (["finetune", "RUN", "--epochs", "1", "--out", "OUT", "--quiet"], 32),
    "report": (["report", "RUN"], 48),
}
OPTIONS_COMMANDS = {
    "show": (["show", "RUN"], 48),
    "prune": (["prune", "RUN", "--out", "OUT"], 48),
    "resume": (["compress", "--resume", "--epochs", "1", "--train-subset", "64", "--out", "FINAL", "--quiet"], 32),
}


def test_the_fuzz_covers_at_least_500_cases_of_each_file():
    assert sum(n for _, n in REPORT_COMMANDS.values()) >= 500
    assert sum(n for _, n in OPTIONS_COMMANDS.values()) >= 100


def _fuzz(runs: dict[str, Path], tmp_path: Path, monkeypatch, source: str, name: str, words: list[str], cases: int,
          seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    before = _digest(runs[source])
    text = (runs[source] / name).read_text()
    outcomes = {"ok": 0, "refused": 0}
    for case in range(cases):
        root = tmp_path / f"case{case}"
        root.mkdir()
        run_dir = root / ("run.partial" if source == "unfinished" else "run")
        _copy(runs[source], run_dir)
        mutated = mutate(text, rng)
        (run_dir / name).write_text(mutated)
        args = [w.replace("RUN", str(run_dir)).replace("OUT", str(root / "out")).replace("FINAL", str(root / "run"))
                for w in words]
        monkeypatch.chdir(root)
        result = CliRunner().invoke(main, args)
        where = f"case {case}: {name} = {mutated[:300]!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{where}\n{result.output}\n{result.exception!r}"
        assert result.exit_code in (0, 1), where
        if result.exit_code == 1:
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}\n{result.output}"
        outcomes["ok" if result.exit_code == 0 else "refused"] += 1
        allowed = {run_dir.name, "out", "run"}
        assert {p.name for p in root.iterdir()} <= allowed, f"{where}: wrote {sorted(p.name for p in root.iterdir())}"
        shutil.rmtree(root)
    assert _digest(runs[source]) == before, "the fixture run was changed"
    return outcomes


@pytest.mark.parametrize("command", list(REPORT_COMMANDS))
def test_mutated_report_json_never_gives_a_traceback(runs, tmp_path, monkeypatch, command):
    words, cases = REPORT_COMMANDS[command]
    outcomes = _fuzz(runs, tmp_path, monkeypatch, "finished", "report.json", words, cases,
                     seed=list(REPORT_COMMANDS).index(command))
    assert outcomes["refused"] > 0  # the mutations do reach the checks


@pytest.mark.parametrize("command", list(OPTIONS_COMMANDS))
def test_mutated_options_json_never_gives_a_traceback(runs, tmp_path, monkeypatch, command):
    words, cases = OPTIONS_COMMANDS[command]
    outcomes = _fuzz(runs, tmp_path, monkeypatch, "unfinished", "options.json", words, cases,
                     seed=100 + list(OPTIONS_COMMANDS).index(command))
    assert outcomes["refused"] > 0
