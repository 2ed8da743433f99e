"""Write the flag tables of docs/commands.md from the command line itself, so they say what `--help` says.

    python docs/make_commands.py          # rewrites the blocks between the <!-- flags:... --> markers

Only the blocks between markers are generated; the prose around them is written by hand. A command
without a marker pair in the page is listed on stderr and left out (add the pair to document it).
`tests/test_readme.py` checks that the page is what this script would write.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

DOC = Path(__file__).resolve().with_name("commands.md")

# compress has some forty options: the page shows them in these groups, in this order; an option
# not named here lands in "other options", so a new one is never hidden
COMPRESS_GROUPS: dict[str, list[str]] = {
    "model, prior, recipe": ["--model", "--prior", "--tau0", "--global-kl", "--recipe", "--dataset"],
    "data": ["--data-dir", "--train-subset", "--no-augment", "--no-verify"],
    "training": ["--epochs", "--seed", "--batch-size", "--lr", "--lr-scale", "--lr-schedule", "--lr-decay-epochs",
                 "--z-draw", "--warmup-epochs", "--kl-weight", "--clip-var", "--grad-clip", "--input-origin", "--device"],
    "starting from a trained network": ["--init-from", "--pretrain-epochs", "--pretrain-lr"],
    "the pruning decision": ["--thresholds", "--auto-thresholds", "--no-split", "--val-budget", "--val-fraction",
                             "--target-kept", "--max-multiply-adds"],
    "bits": ["--bit-accounting", "--variance-scale"],
    "fine-tuning after the cut": ["--finetune-epochs", "--finetune-lr", "--finetune-kl-weight"],
    "the run folder": ["--out", "--resume", "--force", "--quiet"],
}


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    """Every leaf command as ("data fetch", command), in the CLI's own order."""
    found = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        if isinstance(cmd, click.Group):
            found += command_paths(cmd, path)
        else:
            found.append((" ".join(path), cmd))
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def option_rows(cmd: click.Command, ctx: click.Context, names: list[str] | None = None) -> list[str]:
    """Markdown table rows `| flag and value | help [default] |` for the command's options (all, or `names`)."""
    rows = []
    for param in cmd.params:
        if not isinstance(param, click.Option) or (names is not None and param.opts[0] not in names):
            continue
        record = param.get_help_record(ctx)
        if record is None:  # a hidden option
            continue
        flag, help_text = record
        rows.append(f"| `{_cell(flag)}` | {_cell(help_text) or '–'} |")
    return rows


def flag_block(path: str, cmd: click.Command, root: click.Group) -> str:
    """The generated part of one command's section: its usage line and its options, grouped for compress."""
    # the root's context_settings (its `-h`) as the real command line has them: click caches a command's help
    # option from the first context it sees, so a bare parent here would change later `--help` output
    parent = click.Context(root, info_name="bayescomp", **root.context_settings)
    ctx = click.Context(cmd, info_name=f"bayescomp {path}", parent=parent)
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = ["```", f"bayescomp {path} {usage}".rstrip(), "```", ""]
    header = ["| option | what it does |", "|---|---|"]
    if path != "compress":
        rows = option_rows(cmd, ctx)
        return "\n".join(lines + (header + rows if rows else ["No options."]))
    grouped: list[str] = []
    for title, names in COMPRESS_GROUPS.items():
        order = {name: i for i, name in enumerate(names)}
        rows = sorted(option_rows(cmd, ctx, names), key=lambda row: order[row.split("`")[1].split()[0]])
        grouped += [f"**{title}**", "", *header, *rows, ""]
    named = {name for names in COMPRESS_GROUPS.values() for name in names}
    rest = option_rows(cmd, ctx, [p.opts[0] for p in cmd.params if isinstance(p, click.Option)
                                  and p.opts[0] not in named])
    if rest:
        grouped += ["**other options**", "", *header, *rest, ""]
    return "\n".join(lines + grouped).rstrip()


def markers(path: str) -> tuple[str, str]:
    key = path.replace(" ", "-")
    return f"<!-- flags:{key}:begin (written by docs/make_commands.py) -->", f"<!-- flags:{key}:end -->"


def render(text: str, root: click.Group) -> tuple[str, list[str]]:
    """The page with every marked block regenerated, and the commands that have no marker pair."""
    missing = []
    for path, cmd in command_paths(root):
        begin, end = markers(path)
        if begin not in text or end not in text:
            missing.append(path)
            continue
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{flag_block(path, cmd, root)}\n\n{end}{tail}"
    return text, missing


def main() -> None:
    from bayescomp.cli import main as cli

    text, missing = render(DOC.read_text(), cli)
    for path in missing:
        print(f"[make_commands] no markers for `bayescomp {path}` in {DOC.name}; not documented", file=sys.stderr)
    tmp = DOC.with_name(DOC.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
