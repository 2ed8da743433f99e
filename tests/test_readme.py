"""The README and the docs say what the code does: every Python example runs, the first command's flags
run, the quoted figures are the results file's, the command table and the flag reference match the CLI,
and every relative link points at a file that exists."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bayescomp.data
from bayescomp.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets"))
README = ROOT / "README.md"
PAGES = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def _setup_commands() -> list[str]:
    return [line for line in README.read_text().splitlines() if line.startswith("python3 -m venv")]


def _make_commands():
    spec = importlib.util.spec_from_file_location("make_commands", ROOT / "docs" / "make_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_a_short_guide_that_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    commands = _setup_commands()
    assert len(commands) == 2
    assert "bayescomp compress --recipe fast" in commands[0] and "pytest" in commands[1]
    assert text.index(commands[0]) < text.index("## ")  # before the first section
    # the test command is the one CI runs: the dev extra, then pytest
    assert '.venv/bin/pip install -e ".[dev]"' in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-e ".[dev]"' in ci and "pytest" in ci


def test_every_python_example_runs_in_order_in_one_namespace(monkeypatch, tmp_path):
    """Each ```python block as written, one after another, sharing names as a reader's session would;
    compress_pretrained's on 1,000 MNIST images (the README says the full set takes minutes)."""
    blocks = _blocks(README.read_text(), "python")
    assert len(blocks) >= 3
    monkeypatch.setenv("BAYESCOMP_DATA", str(DATA))
    monkeypatch.chdir(tmp_path)  # an example that saves a file writes it here
    torch.manual_seed(0)
    full = bayescomp.data.load_mnist
    namespace: dict = {}
    results = []
    for i, block in enumerate(blocks):
        with monkeypatch.context() as patch:
            if "compress_pretrained(" in block:
                patch.setattr(bayescomp.data, "load_mnist", lambda *a, **k: tuple(t[:1000] for t in full(*a, **k)))
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        results.append((block, namespace.get("result")))
    seen = set()
    for block, result in results:
        assert result is not None and result.report["weights_kept"] > 0
        if "lenet300_100()" in block:  # the dozen lines
            assert isinstance(result.model, torch.nn.Sequential) and result.report["weights_total"] == 266200
            seen.add("dozen")
        elif "compress_pretrained(" in block:
            assert result.report["recipe"] == "fast" and isinstance(result.model, torch.nn.Sequential)
            assert bayescomp.load(tmp_path / "mlp.bcz")(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
            seen.add("pretrained")
        elif "class Block" in block:  # the residual network
            assert isinstance(result.model, torch.fx.GraphModule)
            assert result.model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
            seen.add("residual")
    assert seen == {"dozen", "pretrained", "residual"}


def test_first_command_runs_as_written_on_a_small_subset(tmp_path):
    """The main job's own arguments, with overrides that make it small (given last: the last value wins)."""
    line = _setup_commands()[0]
    words = shlex.split(line[line.index(".venv/bin/bayescomp"):].split("&&")[0])
    assert words[:2] == [".venv/bin/bayescomp", "compress"]
    args = words[2:]
    assert args[args.index("--out") + 1] == "runs/lenet300"
    out = tmp_path / "runs" / "lenet300"
    small = ["--train-subset", "300", "--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1"]
    result = CliRunner().invoke(main, ["compress", *args, *small, "--out", str(out), "--data-dir", str(DATA), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["prior"]) == ("lenet300", "gnj")
    config = report["config"]  # the fast recipe's settings, where the overrides leave them
    assert (config["recipe"], config["lr"], config["lr_schedule"]) == ("fast", 1e-2, "cosine")
    for name in ("report.json", "model.pt", "model.bcz"):  # the files the comment above the command names
        assert (out / name).is_file(), name


def test_the_first_commands_figures_are_the_fast_results_file():
    text = README.read_text()
    m = re.search(r"seeds 0-2: ([\d.]+)-([\d.]+)% test error with ([\d.]+)(?:-([\d.]+))?% of the weights",
                  text.replace("\n#", ""))
    assert m, "the first command's comment quotes the fast recipe's range"
    row = next(r for r in json.loads((ROOT / "benchmarks/results/fast.json").read_text())["rows"]
               if (r["model"], r["prior"]) == ("lenet300", "gnj"))
    assert [s["seed"] for s in row["seeds"]] == [0, 1, 2]
    errors = [s["test_error"] for s in row["seeds"]]
    kept = [s["weights_kept_pct"] for s in row["seeds"]]
    assert (float(m[1]), float(m[2])) == (round(min(errors), 2), round(max(errors), 2))
    assert (float(m[3]), float(m[4] or m[3])) == (round(min(kept), 1), round(max(kept), 1))  # "a-b%", or "a%" if a = b


def test_command_table_names_every_command_once():
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `bayescomp ")]
    named = [re.match(r"\| `bayescomp ([a-z-]+(?: fetch)?)", row)[1] for row in rows]
    commands = [path for path, _ in _make_commands().command_paths(main)]
    assert sorted(named) == sorted(commands)


def test_command_reference_is_what_the_cli_says():
    """docs/commands.md's flag tables are the ones docs/make_commands.py writes from the CLI now."""
    make = _make_commands()
    text = make.DOC.read_text()
    regenerated, missing = make.render(text, main)
    assert missing == [], f"commands without a section in docs/commands.md: {missing}"
    assert regenerated == text, "docs/commands.md is out of date: run python docs/make_commands.py"
    # every option of compress is in the page, none twice
    flags = re.findall(r"^\| `(--[a-z0-9-]+)", text.split("flags:compress:begin")[1].split("flags:compress:end")[0], re.M)
    options = [p.opts[0] for p in main.commands["compress"].params if p.param_type_name == "option"]
    assert sorted(flags) == sorted(options)


def test_writing_the_command_reference_leaves_the_help_option_as_the_cli_has_it():
    """click caches each command's help option from the first context it sees: the page writer's contexts
    must carry the root's settings, or `bayescomp sweep -h` stops working after docs are generated."""
    cmd = main.commands["sweep"]
    cmd._help_option = None  # as if nothing had asked for it yet (click >= 8.2 caches it here)
    _make_commands().flag_block("sweep", cmd, main)
    result = CliRunner().invoke(main, ["sweep", "-h"])
    assert result.exit_code == 0 and "-h, --help" in result.output


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not inside code blocks
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    for link in _links(page):
        assert not re.match(r"[a-z]+:", link), f"{link}: the guide links inside the repository only"
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} does not exist"
        assert ROOT in path.parents or path == ROOT, f"{page.name}: {link} points outside the repository"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading for #{anchor} in {path.name}"


def test_no_readme_path_points_outside_the_repository_but_the_data_root():
    outside = set(re.findall(r"\.\./[\w./-]*", README.read_text()))
    assert outside == {"../shared/datasets"}
    links = _links(README)
    for page in ("docs/commands.md", "docs/distributed.md", "docs/priors.md", "docs/format.md", "benchmarks/README.md"):
        assert page in links, f"the README links {page}"


def test_own_model_page_example_runs_and_slices_the_registered_module(capsys):
    """docs/own-model.md: the registered channel-wise module is sliced with the channels it carries (unregistered,
    it would be a barrier and keep conv1 whole)."""
    from bayescomp.compress import rules

    before = dict(rules.MODULE_RULES)
    namespace: dict = {}
    try:
        for block in _blocks((ROOT / "docs" / "own-model.md").read_text(), "python"):
            exec(compile(block, "docs/own-model.md", "exec"), namespace)
    finally:
        rules.MODULE_RULES.clear()
        rules.MODULE_RULES.update(before)
    result, x = namespace["result"], namespace["x"]
    kept = int(result.report["architecture"].split("-")[0])
    assert kept < 8 and result.model[1].s.shape == (kept,)
    assert result.model(x).shape == (16, 10)
