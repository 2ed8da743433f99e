"""benchmarks/table1.py's table logic: the paper comparison and the block it writes between markers in
benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("table1_script", ROOT / "benchmarks" / "table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(table1):
    run = {"row": "lenet300_gnj", "seed": 0, "status": "run", "paper": table1.PAPER["lenet300_gnj"],
           "test_error": 1.79, "test_error_uncompressed": 1.81, "architecture": "287-102-18",
           "weights_kept_pct": 11.75, "bits": [5, 5, 11], "exponent_bits": 2, "cr_fast": 33.9, "cr_max": 48.8, "file_bytes": 20919,
           "cr_file": 50.9}
    run["meets_paper"] = table1.meets_paper(run, run["paper"])
    pending = {"row": "lenet5_gnj", "status": "in progress: 55 of 200 epochs", "paper": table1.PAPER["lenet5_gnj"]}
    vgg = {"row": "vgg16_gnj", "status": "not run: no CIFAR-10 on this machine", "paper": table1.PAPER["vgg16_gnj"]}
    return [run, pending, vgg]


def test_meets_paper_rule(table1):
    paper = table1.PAPER["lenet300_gnj"]  # 1.8% at 10.8%
    assert table1.meets_paper({"test_error": 1.9, "weights_kept_pct": 10.8}, paper) == "yes"
    assert table1.meets_paper({"test_error": 1.91, "weights_kept_pct": 10.0}, paper) == "no: error 1.91 > 1.9"
    assert table1.meets_paper({"test_error": 1.79, "weights_kept_pct": 11.75}, paper) == "no: kept 11.75% > 10.8%"


def test_readme_block_holds_the_mnist_rows(table1):
    block = table1.readme_block(_table(table1))
    assert block.startswith(table1.BEGIN) and block.endswith(table1.END)
    lines = [line for line in block.splitlines() if line.startswith("| lenet")]
    assert len(lines) == 2  # VGG rows are in table1.md only
    assert lines[0] == ("| lenet300_gnj | 1.79 (1.81) | 287-102-18 | 11.75 | 8-8-14 (5-5-11) | 33.9 | 48.8 | 20,919 (50.9) "
                        "| 1.8%, 10.8% | no: kept 11.75% > 10.8% |")
    assert lines[1].endswith("| 1.0%, 0.9% | in progress: 55 of 200 epochs |")


def test_total_bits_are_sign_exponent_and_mantissa(table1):
    """Table 1 compares bits per stored weight with the paper's: 1 + E + T by hand, 32 for a float32 layer."""
    assert table1._total_bits({"bits": [5, 5, 11], "exponent_bits": 2}) == "8-8-14"
    assert table1._total_bits({"bits": [17, 8, None], "exponent_bits": 3}) == "21-12-32"
    assert table1._total_bits({"bits": [5, 5, 11]}) == "–"  # a file without exponent bits: not guessed


def test_readme_block_replaces_only_what_is_between_the_markers(table1, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{table1.BEGIN}\nold table\n{table1.END}\n\nafter\n")
    table1.write_readme_block(_table(table1), readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n" + table1.BEGIN) and text.endswith(table1.END + "\n\nafter\n")
    assert "old table" not in text and "| lenet300_gnj | 1.79 (1.81)" in text
    table1.write_readme_block(_table(table1), readme)  # idempotent
    assert readme.read_text() == text
    assert not list(tmp_path.glob("*.tmp"))


def test_readme_without_markers_is_left_alone(table1, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    table1.write_readme_block(_table(table1), readme)
    assert readme.read_text() == "# no markers here\n"
    assert "no table1 markers" in capsys.readouterr().err


def test_the_block_goes_into_the_benchmarks_readme_not_the_package_readme(table1):
    assert table1.README == ROOT / "benchmarks" / "README.md"
    text = table1.README.read_text()
    assert text.count(table1.BEGIN) == 1 and text.count(table1.END) == 1
    assert text.index(table1.BEGIN) < text.index(table1.END)
    assert table1.BEGIN not in (ROOT / "README.md").read_text()



def test_row_in_progress_shows_what_prune_of_the_partial_folder_gives(table1, tmp_path, monkeypatch):
    """The interim figures of a row still training are `bayescomp prune DIR.partial`'s, bits included."""
    import os

    from helpers import interrupted_run

    from bayescomp.pipeline import RunOptions, recompress

    data = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))
    opts = RunOptions(model="lenet300", epochs=1, train_subset=500, data_dir=data)
    interrupted_run(opts, tmp_path / "row", monkeypatch)
    partial = tmp_path / "row.partial"
    text = table1._interim(partial, opts)
    peek = recompress(tmp_path / "row", tmp_path / "peek", None, data_dir=data)
    assert text == (f"; at epoch 1: {peek['test_error']:.2f}% error ({peek['test_error_uncompressed']:.2f} unpruned), "
                    f"{peek['weights_kept_pct']:.2f}% kept, {peek['architecture']}, "
                    f"bits {'-'.join(str(b) for b in peek['bits'])}")
    assert table1._interim(tmp_path / "nothing.partial", opts).startswith(" (no interim figures: ")


def test_recipe_row_is_the_paper_row_with_its_changes(table1):
    paper_row = table1.row_options("lenet300_ghs", 0, False, None)
    recipe = table1.row_options("lenet300_ghs_tempered", 0, False, None)
    assert (recipe.model, recipe.prior, recipe.epochs, recipe.auto_thresholds) == ("lenet300", "ghs", 200, "histogram")
    assert (recipe.kl_weight, recipe.pretrain_epochs) == (0.3, 20)
    assert (paper_row.kl_weight, paper_row.pretrain_epochs) == (1.0, 0)
    assert table1.row_options("lenet300_ghs_tempered", 0, True, None).pretrain_epochs == 1  # --quick stays quick
    assert table1.paper_of("lenet300_ghs_tempered") is table1.PAPER["lenet300_ghs"]
    # a results file of the paper setting is not taken for the recipe row, nor the other way round
    saved = {"config": {"epochs": 200, "seed": 0, "prior": "ghs", "model": "lenet300", "train_subset": None,
                        "auto_thresholds": "histogram"}}
    assert table1._same_setting(saved, paper_row) and not table1._same_setting(saved, recipe)
    saved["config"].update(kl_weight=0.3, pretrain_epochs=20)
    assert table1._same_setting(saved, recipe) and not table1._same_setting(saved, paper_row)
    saved["config"].update(lr_schedule="cosine")  # another schedule is another setting
    assert not table1._same_setting(saved, recipe)
    saved["config"].update(lr_schedule="constant", lr_decay_epochs=20.0)  # ... and so is a decay length
    assert not table1._same_setting(saved, recipe)
    # the fine-tuned recipe: the tempered one plus --finetune-epochs 10; their results files are not mixed up
    tuned = table1.row_options("lenet300_ghs_tempered_ft", 0, False, None)
    assert (tuned.kl_weight, tuned.pretrain_epochs, tuned.finetune_epochs, recipe.finetune_epochs) == (0.3, 20, 10, 0)
    assert table1.row_options("lenet300_ghs_tempered_ft", 0, True, None).finetune_epochs == 1
    saved["config"].update(lr_decay_epochs=None)
    assert table1._same_setting(saved, recipe) and not table1._same_setting(saved, tuned)
    saved["config"].update(finetune_epochs=10)
    assert table1._same_setting(saved, tuned) and not table1._same_setting(saved, recipe)
    saved["config"].update(auto_thresholds=None)  # another threshold rule is another setting
    assert not table1._same_setting(saved, tuned)


def test_gnj_recipe_row_cuts_fc1_harder_and_fine_tunes(table1):
    paper_row = table1.row_options("lenet300_gnj", 0, False, None)
    recipe = table1.row_options("lenet300_gnj_ft", 0, False, None)
    assert (recipe.thresholds, recipe.finetune_epochs) == ({"fc1": -3.5, "fc2": -3.0, "fc3": -5.0}, 10)
    assert (paper_row.thresholds, paper_row.finetune_epochs, recipe.kl_weight) == (None, 0, 1.0)
    assert table1.paper_of("lenet300_gnj_ft") is table1.PAPER["lenet300_gnj"]
    # the paper row's results file (written before thresholds and fine-tuning were options) is not this row's
    saved = {"config": {"epochs": 200, "seed": 0, "prior": "gnj", "model": "lenet300", "train_subset": None,
                        "thresholds": None}}
    assert table1._same_setting(saved, paper_row) and not table1._same_setting(saved, recipe)
    saved["config"].update(thresholds={"fc1": -3.5, "fc2": -3.0, "fc3": -5.0}, finetune_epochs=10)
    assert table1._same_setting(saved, recipe)
    assert table1.table_rows().index("lenet300_gnj_ft") == table1.table_rows().index("lenet300_gnj") + 1


def test_recipe_row_shows_in_the_readme_block(table1):
    run = {"row": "lenet300_ghs_tempered", "seed": 0, "status": "run", "paper": table1.paper_of("lenet300_ghs_tempered"),
           "test_error": 1.69, "test_error_uncompressed": 1.62, "architecture": "267-68-65", "weights_kept_pct": 8.73,
           "bits": [5, 6, 13], "cr_fast": 39.0, "cr_max": 65.6, "file_bytes": 17276, "cr_file": 61.6}
    run["meets_paper"] = table1.meets_paper(run, run["paper"])
    assert run["meets_paper"] == "yes"  # 1.69 ≤ 1.8 + 0.1 at 8.73% ≤ 10.6%
    line = next(ln for ln in table1.readme_block([run]).splitlines() if ln.startswith("| lenet300_ghs_tempered"))
    assert line.endswith("| 1.8%, 10.6% | yes |")


def test_table_order_puts_each_recipe_row_after_its_paper_row(table1):
    rows = table1.table_rows()
    assert rows.index("lenet300_ghs_tempered") == rows.index("lenet300_ghs") + 1
    assert set(rows) == {*table1.MNIST_ROWS, *table1.VGG_ROWS, *table1.RECIPE_ROWS} and len(rows) == len(set(rows))


def test_readme_block_names_the_seed_of_a_second_seed(table1):
    run = dict(_table(table1)[0], seed=1)
    line = next(ln for ln in table1.readme_block([run]).splitlines() if ln.startswith("| lenet300_gnj"))
    assert line.startswith("| lenet300_gnj (seed 1) | 1.79 (1.81) |")


def test_test_error_standard_error_by_hand(table1):
    # √(0.018 · 0.982 / 10,000) = 0.0013295 → 0.133 points; it shrinks as √n
    assert table1.test_error_se(1.8) == pytest.approx(0.13295, abs=1e-5)
    assert table1.test_error_se(1.8, 40_000) == pytest.approx(0.13295 / 2, abs=1e-5)
    assert table1.test_error_se(0.0) == 0.0


def test_seed_summary_over_the_seeds_of_a_row(table1):
    one = _table(table1)[0]
    seeds = [dict(one, seed=s, test_error=e, test_error_uncompressed=u, weights_kept_pct=k,
                  meets_paper=table1.meets_paper({"test_error": e, "weights_kept_pct": k}, one["paper"]))
             for s, e, u, k in ((0, 1.7, 1.6, 9.0), (1, 1.9, 1.8, 10.0), (2, 2.1, 2.0, 11.0))]
    summary = table1.seed_summary([*seeds, *_table(table1)[1:]])  # a row with one seed or none has no entry
    assert len(summary) == 1
    entry = summary[0]
    assert entry["row"] == "lenet300_gnj" and entry["seeds"] == [0, 1, 2]
    # mean 1.9; sd (n − 1) = √((0.04 + 0 + 0.04) / 2) = 0.2
    assert entry["test_error"]["mean"] == pytest.approx(1.9) and entry["test_error"]["sd"] == pytest.approx(0.2)
    assert entry["weights_kept_pct"] == {"mean": pytest.approx(10.0), "sd": pytest.approx(1.0), "min": 9.0, "max": 11.0}
    assert entry["meets_paper"] == 2  # 1.7 at 9% and 1.9 at 10% (≤ 1.8 + 0.1 at ≤ 10.8%); not 2.1 at 11%
    assert entry["one_run_se"] == pytest.approx(table1.test_error_se(1.9))
    line = table1.summary_lines(summary)[-1]
    assert line == "| lenet300_gnj | 0,1,2 | 1.90 ± 0.20 | 1.80 ± 0.20 | 10.00 ± 1.00 (9.00-11.00) | 2 of 3 | ±0.14 |"
    assert line in table1.readme_block(seeds)
    assert table1.summary_lines(table1.seed_summary(_table(table1))) == []


def test_origin_recipe_row_shifts_the_inputs_and_cuts_unsplit_layers_at_the_floor(table1):
    tempered = table1.row_options("lenet300_ghs_tempered_ft", 0, False, None)
    origin = table1.row_options("lenet300_ghs_origin_ft", 0, False, None)
    assert (origin.input_origin, origin.thresholds, origin.auto_thresholds) == (-1.0, None, "histogram")
    assert origin.no_split == "floor" and tempered.no_split == "keep"
    assert (origin.kl_weight, origin.pretrain_epochs, origin.finetune_epochs) == (0.3, 20, 10)
    saved = {"config": {"epochs": 200, "seed": 0, "prior": "ghs", "model": "lenet300", "train_subset": None,
                        "auto_thresholds": "histogram", "kl_weight": 0.3, "pretrain_epochs": 20,
                        "finetune_epochs": 10}}
    assert table1._same_setting(saved, tempered) and not table1._same_setting(saved, origin)
    saved["config"].update(input_origin=-1.0, thresholds={"fc1": 2.0})  # the row's first form: fc1 given
    assert not table1._same_setting(saved, origin) and not table1._same_setting(saved, tempered)
    saved["config"].update(thresholds=None, no_split="floor")
    assert table1._same_setting(saved, origin) and not table1._same_setting(saved, tempered)


def test_rows_chosen_on_test_errors_never_say_meets_paper(table1, tmp_path):
    """A recipe row whose settings were adopted after comparing test errors is a diagnostic, however good."""
    good = {"test_error": 1.5, "weights_kept_pct": 5.0, "architecture": "200-50-10", "bits": [5, 5, 11]}
    for row in ("lenet300_gnj", "lenet300_gnj_ft"):
        (tmp_path / f"{row}.json").write_text(json.dumps(good))
    table = {r["row"]: r for r in table1.build_table(["lenet300_gnj", "lenet300_gnj_ft"], [0], tmp_path, {})}
    assert (table["lenet300_gnj"]["selection"], table["lenet300_gnj"]["meets_paper"]) == ("fixed", "yes")
    assert (table["lenet300_gnj_ft"]["selection"], table["lenet300_gnj_ft"]["meets_paper"]) == ("test", table1.DIAGNOSTIC)
    summary = table1.summary_lines(table1.seed_summary([table["lenet300_gnj_ft"], {**table["lenet300_gnj_ft"], "seed": 1}]))
    assert "| diagnostic |" in summary[-1]
