"""Write benchmarks/RESULTS.md from benchmarks/results/*.json, beside the paper's figures.

    python benchmarks/summarize.py

The paper's figures are the method notes' reconstruction of Table 1 (../shared/reference/
bc-method-notes.md §7.1); each carries the notes' certainty tag.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: (model, prior) -> paper figures as reconstructed in the method notes, with their tags
PAPER = {
    ("lenet300", "gnj"): {"architecture": "278-98-13 [recalled]", "test_error": "1.8 [recalled]",
                          "weights_kept_pct": "10.8 [recalled]", "bits": "8-9-14 [recalled, uncertain]",
                          "cr_fast": "33-37 [recalled/derived]", "cr_max": "58 [recalled]"},
    ("lenet300", "ghs"): {"architecture": "311-86-14 [recalled]", "test_error": "1.8 [recalled]",
                          "weights_kept_pct": "10.6 [recalled]", "bits": "13-11-10 [recalled]",
                          "cr_fast": "24 [recalled]", "cr_max": "59 [recalled]"},
    ("lenet5", "gnj"): {"architecture": "8-13-88-13 [read-2nd]", "test_error": "1.0 [read]",
                        "weights_kept_pct": "0.9 [recalled]", "bits": "not recovered",
                        "cr_fast": "361 [read]", "cr_max": "573 [recalled]"},
    ("lenet5", "ghs"): {"architecture": "5-10-76-16 [read-2nd]", "test_error": "1.0 [read]",
                        "weights_kept_pct": "0.6 [read-2nd]", "bits": "10-10-14-13 [recalled]",
                        "cr_fast": "419 [read]", "cr_max": "771 [recalled]"},
}


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return "-".join("32" if v is None else str(v) for v in value)
    return format(value, spec) if spec else str(value)


def main() -> None:
    rows = []
    for path in sorted(RESULTS.glob("*_*.json")):
        r = json.loads(path.read_text())
        if "model" not in r or "prior" not in r:
            continue
        paper = PAPER.get((r["model"], r["prior"]), {})
        rows.append((r, paper, path.name))
    lines = [
        "# Benchmark results",
        "",
        "Measured on this project's machines (2 CPU cores); every row comes from the results file named in",
        "its first column, which also holds the exact command. Paper figures: the method notes' reconstruction",
        "of Table 1, with their certainty tags. `cr_fast` uses the paper code's accounting (1 + E + T bits per",
        "weight) unless the file says otherwise. Each file also says how its settings were chosen (`selection`:",
        "fixed, rule, validation, test — a diagnostic — or none) with the evidence (`selection_note`). The commands",
        "are the ones that ran; today `paper_setting.py` and `resnet_mnist.py` also ask for `--selection` and",
        "`--selection-note` when a setting is given on the command line.",
        "",
        "| run | epochs | test error % (paper) | uncompressed % | architecture (paper) | weights kept % (paper) "
        "| bits (paper) | CR arch | CR fast (paper) | CR max (paper) | CR file | file bytes | train s | step ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, p, name in rows:
        speed = r.get("speed", {})
        lines.append(
            f"| {name} | {r['epochs']} | {r['test_error']:.2f} ({p.get('test_error', '–')}) "
            f"| {r['test_error_uncompressed']:.2f} | {r['architecture']} ({p.get('architecture', '–')}) "
            f"| {r['weights_kept_pct']:.2f} ({p.get('weights_kept_pct', '–')}) | {_fmt(r['bits'])} ({p.get('bits', '–')}) "
            f"| {r['cr_architecture']:.1f} | {r['cr_fast']:.1f} ({p.get('cr_fast', '–')}) "
            f"| {_fmt(r.get('cr_max'), '.1f')} ({p.get('cr_max', '–')}) | {_fmt(r.get('cr_file'), '.1f')} "
            f"| {_fmt(r.get('file_bytes'))} | {r['train_seconds']:.0f} | {_fmt(speed.get('train_step_ratio'), '.2f')} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- `{name}`: `{r.get('command', '?')}`" for r, _, name in rows]
    (RESULTS.parent / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS.parent / 'RESULTS.md'} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
