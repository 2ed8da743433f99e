"""The command line's run options, generated from the option table (`runoptions.OPTIONS`), and the parsing
of their values (a number or name=value pairs per layer, kind=factor pairs)."""

from __future__ import annotations

from typing import Any

import click

from .runoptions import OPTIONS


def _parse_per_layer(text: str | None, hint: str) -> float | dict[str, float] | None:
    """ "-3" → every layer; "fc1=-2.8,fc2=-3" → per layer (`hint`: the option, for the error)."""
    if text is None:
        return None
    text = text.strip()
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            out[name.strip()] = float(value)
        return out
    except ValueError:
        raise click.BadParameter(f"expected a number or name=value pairs, got {text!r}", param_hint=hint) from None


def parse_thresholds(text: str | None) -> float | dict[str, float] | None:
    """ "-3" → every layer; "fc1=-2.8,fc2=-3" → per layer."""
    return _parse_per_layer(text, "--thresholds")


def _parse_lr_scale(text: str | None) -> dict[str, float] | None:
    """ "variance=1,scale=10" → {"variance": 1.0, "scale": 10.0} (the kinds are checked with the other options)."""
    if text is None:
        return None
    parsed = _parse_per_layer(text, "--lr-scale")
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"expected kind=factor pairs (mean, variance, scale), got {text!r}",
                                 param_hint="--lr-scale")
    return parsed


def click_option(o, command: str):
    """The click option of run option `o` (a `runoptions.Option` record) in `command`."""
    kwargs: dict[str, Any] = {"help": o.help_for(command)}
    if o.cli == "negated":
        return click.option(o.flag, is_flag=True, **kwargs)
    default = o.default_for(command)
    if o.choices is not None:
        kwargs["type"] = click.Choice(list(o.choices))
    elif o.cli == "path":
        kwargs["type"] = click.Path()
    elif o.cli == "value" and o.annotation.split(" ")[0] in ("int", "float"):
        kwargs["type"] = int if o.annotation.startswith("int") else float
    return click.option(o.flag, default=default, show_default=default is not None, **kwargs)


def run_options(command: str):
    """The command line's options of `command` ("compress", "sweep", "prune", ...): one per run option that it
    takes, generated from the option table (`runoptions.OPTIONS`), in the table's order."""
    def decorate(f):
        for o in reversed([o for o in OPTIONS if command in o.commands]):
            f = click_option(o, command)(f)
        return f
    return decorate


def _param(o) -> str:
    """The click parameter that carries option `o` ("--clip-var" -> clip_var)."""
    return o.flag[2:].replace("-", "_")


def run_values(command: str, params: dict[str, Any]) -> dict[str, Any]:
    """The RunOptions fields from `command`'s parsed command line (`params`): per-layer values and learning-rate
    factors parsed, --no-... flags turned into their fields."""
    parse = {"per_layer": lambda v, o: _parse_per_layer(v, o.flag), "lr_scale": lambda v, o: _parse_lr_scale(v),
             "negated": lambda v, o: not v}
    return {o.name: parse.get(o.cli, lambda v, o: v)(params[_param(o)], o) for o in OPTIONS if command in o.commands}
