"""The shrunk model as a loadable file: a JSON spec plus a state_dict, read with weights_only=True.

Loading never unpickles code: the architecture is rebuilt from a whitelist of plain PyTorch module
types and their constructor arguments, then the tensors are loaded into it. A stored ``MaxPool2d`` is
rebuilt as `FastMaxPool2d` (the same values, faster on the CPU), and a `FastMaxPool2d` is written as
``MaxPool2d``: the files do not tell them apart.

Two kinds of architecture are stored:

* a flat `nn.Sequential` chain (what `compress()` makes): a JSON list of layers (`model_spec`),
  file version 1;
* a `torch.fx.GraphModule` (what `graph_compress()` makes for residual and concatenating networks):
  a JSON graph (`graph_spec`) of whitelisted modules, buffers and nodes whose functions and tensor
  methods come from an explicit whitelist (`FUNCTIONS`, `METHODS`), file version 2.

torch.fx turns a graph into Python source and runs it, and it writes module paths, placeholder names
and keyword names into that source verbatim; so every such string is checked to be a plain
identifier (or, inside a module path, a decimal index) before anything is built. Whatever a file says,
the generated `forward` can only call whitelisted modules, functions and tensor methods.
"""

from __future__ import annotations

import json
import keyword
import math
import operator
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..base import atomic_write, load_error
from ..compress.graph import Realign
from ..compress.shrink import AppendOnes, FastMaxPool2d, Select

FORMAT = "bayescomp-plain"
#: file version of a chain model (the layer list); graph models are written as GRAPH_VERSION
VERSION = 1
GRAPH_VERSION = 2
VERSIONS = (VERSION, GRAPH_VERSION)


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, from a newer version, or describes unknown layers."""


#: type name -> (class built on loading, constructor arguments read off an instance)
_LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "ELU": (nn.ELU, ("alpha",)),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ()),
    "Tanh": (nn.Tanh, ()),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "Softsign": (nn.Softsign, ()),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p",)),
    "Dropout1d": (nn.Dropout1d, ("p",)),
    "Dropout2d": (nn.Dropout2d, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "MaxPool1d": (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "MaxPool2d": (FastMaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool1d": (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool1d": (nn.AdaptiveMaxPool1d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
    "Select": (Select, ("n_in",)),
    "AppendOnes": (AppendOnes, ()),
    # what graph_compress may emit besides the above: its channel-wise modules and barriers, and Realign
    "Sigmoid": (nn.Sigmoid, ()),
    "Hardswish": (nn.Hardswish, ()),
    "Hardsigmoid": (nn.Hardsigmoid, ()),
    "Mish": (nn.Mish, ()),
    "Softplus": (nn.Softplus, ("beta", "threshold")),
    "LogSigmoid": (nn.LogSigmoid, ()),
    "SELU": (nn.SELU, ()),
    "CELU": (nn.CELU, ("alpha",)),
    "ZeroPad2d": (nn.ZeroPad2d, ("padding",)),
    "ConstantPad2d": (nn.ConstantPad2d, ("padding", "value")),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
    "Realign": (Realign, ()),
}

#: class -> the type name it is stored under: each class of _LAYERS, and nn.MaxPool2d written like FastMaxPool2d
_STORED_AS: dict[type[nn.Module], str] = {cls: kind for kind, (cls, _) in _LAYERS.items()} | {nn.MaxPool2d: "MaxPool2d"}

#: arguments written beyond the constructor arguments above (padding_mode only when it is not "zeros")
EXTRA_ARGS: dict[str, set[str]] = {
    "Linear": {"bias"},
    "Conv2d": {"bias", "padding_mode"},
    "Select": {"index_size"},
    "Realign": {"n_carried", "n_channels"},
}
#: type name -> every argument a stored layer entry may have (readers refuse any other)
STORED_ARGS: dict[str, frozenset[str]] = {k: frozenset(a) | EXTRA_ARGS.get(k, set()) for k, (_, a) in _LAYERS.items()}

#: call_function targets a stored graph may use: pure tensor functions, by a stable name. These are the
#: functions graph_compress can emit (it re-emits the model's own element-wise ops, reductions over
#: spatial dimensions, barriers, cat and flatten); a test checks that graph.py's op tables stay inside it.
FUNCTIONS: dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in ("add", "sub", "mul", "truediv", "neg")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "add", "sub", "mul", "div", "true_divide", "cat", "concat", "concatenate", "flatten", "relu", "sigmoid",
        "tanh", "mean", "sum", "amax", "amin", "softmax", "log_softmax")},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in (
        "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
        "hardtanh", "softplus", "logsigmoid", "sigmoid", "tanh", "dropout", "dropout1d", "dropout2d", "max_pool1d",
        "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d",
        "adaptive_max_pool2d", "interpolate", "pad", "softmax", "log_softmax", "normalize")},
}  # fmt: skip
#: function -> its name in FUNCTIONS (the first, where one function has two names)
_FUNCTION_NAMES: dict[Any, str] = {fn: name for name, fn in reversed(FUNCTIONS.items())}

#: call_method targets (tensor methods) a stored graph may use
METHODS = frozenset({"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "mean", "sum", "amax", "amin",
                     "softmax", "log_softmax", "add", "sub", "mul", "div"})

#: names the forward that torch.fx generates uses besides its nodes' (its first parameter, the getattr builtin and
#: torch.fx's own globals): an input (a parameter of that forward) must not shadow them
_RESERVED_INPUTS = frozenset({"self", "getattr", *getattr(fx.graph, "_custom_builtins", {"torch": None})})

OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_PATH_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_MAX_DEPTH = 16  # nesting of argument lists
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _layer_entry(name: str, m: nn.Module) -> dict[str, Any]:
    """Name, type and constructor arguments of one whitelisted module; ModelFileError for any other."""
    kind = _STORED_AS.get(type(m))
    if kind is None:
        raise ModelFileError(f"{name}: {type(m).__name__} cannot be stored in a plain model file")
    args = {a: _jsonable(getattr(m, a)) for a in _LAYERS[kind][1]}
    if kind in ("Linear", "Conv2d"):
        args["bias"] = m.bias is not None
    if kind == "Conv2d" and m.padding_mode != "zeros":
        args["padding_mode"] = m.padding_mode
    if kind == "Select":
        args["index_size"] = int(m.index.numel())
    if kind == "Realign":
        if m.src.numel() != m.dst.numel():
            raise ModelFileError(f"{name}: Realign with {m.src.numel()} sources but {m.dst.numel()} destinations")
        args.update(n_carried=int(m.src.numel()), n_channels=int(m.fill.numel()))
    return {"name": name, "type": kind, "args": args}


def _build_layer(entry: Any) -> tuple[str, nn.Module]:
    """(name, module with arbitrary weights) from a layer entry; unknown types and arguments are refused."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or not isinstance(entry.get("args"), dict):
        raise ModelFileError(f"invalid layer description in model file: {str(entry)[:80]}")
    kind, args = entry["type"], dict(entry["args"])
    if kind not in _LAYERS:
        raise ModelFileError(f"unknown layer type {kind!r} in model file")
    unexpected = set(args) - set(_LAYERS[kind][1]) - EXTRA_ARGS.get(kind, set())
    if unexpected:  # only the arguments the writer writes: no device=, dtype= or other surprises
        raise ModelFileError(f"layer {entry.get('name')!r} ({kind}) has unexpected arguments {sorted(unexpected)}")
    cls = _LAYERS[kind][0]
    if kind == "Select":
        return str(entry["name"]), Select(torch.zeros(int(args["index_size"]), dtype=torch.long), args.get("n_in"))
    if kind == "Realign":
        n, c = int(args["n_carried"]), int(args["n_channels"])
        index = torch.zeros(n, dtype=torch.long)
        return str(entry["name"]), Realign(index, index, torch.zeros(c))
    return str(entry["name"]), cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def model_spec(model: nn.Sequential) -> list[dict[str, Any]]:
    """The layer list of a flat plain `nn.Sequential`: name, type and constructor arguments."""
    return [_layer_entry(name, m) for name, m in model.named_children()]


def build_from_spec(spec: list[dict[str, Any]]) -> nn.Sequential:
    """Rebuild the plain model (random weights) from its layer list; unknown types are refused."""
    model = nn.Sequential()
    try:
        for entry in spec:
            name, module = _build_layer(entry)
            model.add_module(name, module)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"invalid layer description in model file: {exc}") from exc
    return model


# ---- graphs ------------------------------------------------------------------------------------------------


def _check_identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value) or not value.isascii():
        raise ModelFileError(f"{what} {value!r} is not a plain identifier")
    return value


def _check_path(value: Any, what: str) -> str:
    """A dotted module/attribute path whose parts are identifiers or decimal indices (e.g. ``layer1.0.conv1``)."""
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise ModelFileError(f"{what} {str(value)[:80]!r} is not a module path")
    for part in value.split("."):
        if not _PATH_PART.fullmatch(part) or keyword.iskeyword(part):
            raise ModelFileError(f"{what} {value!r} is not a module path (bad part {part!r})")
    return value


def _encode_arg(value: Any, where: str) -> Any:
    """A node argument as JSON: nodes as {"node": name}, tuples as {"tuple": [...]}, lists and scalars as is."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelFileError(f"{where}: the non-finite argument {value} cannot be stored")
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode_arg(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode_arg(v, where) for v in value]
    raise ModelFileError(f"{where}: an argument of type {type(value).__name__} cannot be stored in a model file")


def _decode_arg(value: Any, env: dict[str, fx.Node], where: str, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ModelFileError(f"{where}: arguments nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelFileError(f"{where}: non-finite argument")
        return value
    if isinstance(value, list):
        return [_decode_arg(v, env, where, depth + 1) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "node":
            if not isinstance(inner, str) or inner not in env:
                raise ModelFileError(f"{where} refers to the unknown node {str(inner)[:80]!r}")
            return env[inner]
        if tag == "tuple" and isinstance(inner, list):
            return tuple(_decode_arg(v, env, where, depth + 1) for v in inner)
    raise ModelFileError(f"{where}: invalid argument {str(value)[:80]}")


def _tensor_attr(root: nn.Module, target: str) -> torch.Tensor | None:
    owner, _, attr = target.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    value = module._parameters.get(attr, module._buffers.get(attr))
    return value if isinstance(value, torch.Tensor) else None


def graph_spec(gm: fx.GraphModule) -> dict[str, Any]:
    """The JSON description of a plain `torch.fx.GraphModule`: its modules, its loose buffers and its nodes.

    Raises `ModelFileError` naming the node or module that cannot be stored (a module type outside the
    whitelist, a function outside `FUNCTIONS`, a method outside `METHODS`, an argument that is not a
    node, number, string, list or tuple).
    """
    modules: list[dict[str, Any]] = []
    listed: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in listed:
            target = _check_path(node.target, f"node {node.name!r}: module")
            modules.append(_layer_entry(target, gm.get_submodule(target)))
            listed.add(target)
    buffers: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    for node in gm.graph.nodes:
        where = f"node {node.name!r}"
        entry: dict[str, Any] = {"name": _check_identifier(node.name, "node name"), "op": node.op}
        if node.op == "placeholder":
            entry["target"] = _check_identifier(node.target, f"{where}: input name")
            if entry["target"] in _RESERVED_INPUTS:
                raise ModelFileError(f"{where}: {node.target!r} is a reserved name and cannot name an input")
        elif node.op == "call_module":
            entry["target"] = node.target
        elif node.op == "get_attr":
            target = _check_path(node.target, f"{where}: attribute")
            tensor = _tensor_attr(gm, target)
            if tensor is None:
                raise ModelFileError(f"{where}: attribute {target!r} is not a tensor of the model")
            owner = target.rpartition(".")[0]
            if owner not in listed and not any(b["name"] == target for b in buffers):
                dtype = str(tensor.dtype).removeprefix("torch.")
                if dtype not in _DTYPES:
                    raise ModelFileError(f"{where}: tensor {target!r} of dtype {tensor.dtype} cannot be stored")
                buffers.append({"name": target, "shape": list(tensor.shape), "dtype": dtype})
            entry["target"] = target
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(node.target)
            if name is None:
                raise ModelFileError(f"{where}: function {getattr(node.target, '__name__', node.target)!r} is not in "
                                     "the whitelist of functions a model file may call")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise ModelFileError(f"{where}: tensor method {node.target!r} is not in the whitelist")
            entry["target"] = node.target
        elif node.op != "output":
            raise ModelFileError(f"{where}: op {node.op!r} cannot be stored")
        if node.args:
            entry["args"] = [_encode_arg(a, where) for a in node.args]
        if node.kwargs:
            entry["kwargs"] = {_check_identifier(k, f"{where}: keyword"): _encode_arg(v, where)
                               for k, v in node.kwargs.items()}
        nodes.append(entry)
    return {"class_name": _check_identifier(type(gm).__name__, "class name"), "modules": modules,
            "buffers": buffers, "nodes": nodes}


def _add_at(root: nn.Module, path: str, module: nn.Module | None = None, tensor: torch.Tensor | None = None,
            leaves: set[str] | None = None) -> None:
    """Put a module (or a buffer) at a dotted path under root, making empty container modules on the way."""
    *parents, last = path.split(".")
    parent = root
    for i, p in enumerate(parents):
        prefix = ".".join(parents[: i + 1])
        if leaves is not None and prefix in leaves:
            raise ModelFileError(f"{path!r} lies inside the layer {prefix!r}")
        child = parent._modules.get(p)
        if child is None:
            if hasattr(parent, p):
                raise ModelFileError(f"{path!r}: the name {p!r} is reserved")
            child = nn.Module()
            parent.add_module(p, child)
        parent = child
    if last in parent._modules or last in parent._buffers or last in parent._parameters or hasattr(parent, last):
        raise ModelFileError(f"{path!r} is defined twice or uses a reserved name")
    if module is not None:
        parent.add_module(last, module)
    else:
        parent.register_buffer(last, tensor)


def build_graph(spec: dict[str, Any]) -> fx.GraphModule:
    """Rebuild the plain GraphModule (arbitrary weights) from `graph_spec`'s description.

    Every module type, function and method must be on its whitelist and every node argument must refer
    to a node defined before it; anything else raises `ModelFileError` naming the node.
    """
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), list) for k in ("modules", "buffers", "nodes")):
        raise ModelFileError("graph description has the wrong structure")
    class_name = _check_identifier(spec.get("class_name", "GraphModule"), "class name")
    root = nn.Module()
    leaves: set[str] = set()
    try:
        for entry in spec["modules"]:
            name, module = _build_layer(entry)
            _check_path(name, "layer name")
            if any(other.startswith(name + ".") for other in leaves):
                raise ModelFileError(f"layer {name!r} would contain another layer")
            _add_at(root, name, module=module, leaves=leaves)
            leaves.add(name)
        for entry in spec["buffers"]:
            if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES or not isinstance(entry.get("shape"), list):
                raise ModelFileError(f"invalid buffer description {str(entry)[:80]}")
            name = _check_path(entry.get("name"), "buffer name")
            shape = entry["shape"]
            if len(shape) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 31 for s in shape):
                raise ModelFileError(f"buffer {name!r}: invalid shape {shape}")
            _add_at(root, name, tensor=torch.zeros(shape, dtype=_DTYPES[entry["dtype"]]), leaves=leaves)
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted arguments can make any constructor fail
        raise ModelFileError(f"invalid layer description in model file: {type(exc).__name__}: {exc}") from exc
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    used: set[str] = set()
    nodes = spec["nodes"]
    if not nodes or not isinstance(nodes[-1], dict) or nodes[-1].get("op") != "output":
        raise ModelFileError("graph description does not end with its output node")
    buffer_names = {e["name"] for e in spec["buffers"]}
    for i, entry in enumerate(nodes):
        if not isinstance(entry, dict):
            raise ModelFileError(f"node {i} of the graph is not a description")
        name = _check_identifier(entry.get("name"), "node name")
        where = f"node {name!r}"
        if name in env or name == "self":  # `self` is the generated forward's first parameter
            raise ModelFileError(f"{where} is defined twice or uses a reserved name")
        op, target = entry.get("op"), entry.get("target")
        if op not in OPS:
            raise ModelFileError(f"{where}: unknown op {str(op)[:40]!r}")
        if op == "output" and i != len(nodes) - 1:
            raise ModelFileError(f"{where}: the output node must come last, and only once")
        if op != "output" and not isinstance(target, str):
            raise ModelFileError(f"{where}: its target must be a string, not {str(target)[:80]}")
        raw_args, raw_kwargs = entry.get("args", []), entry.get("kwargs", {})
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
            raise ModelFileError(f"{where}: args must be a list and kwargs a table")
        args = tuple(_decode_arg(a, env, where) for a in raw_args)
        kwargs = {_check_identifier(k, f"{where}: keyword"): _decode_arg(v, env, where) for k, v in raw_kwargs.items()}
        if op == "placeholder":
            if _check_identifier(target, f"{where}: input name") in _RESERVED_INPUTS:
                raise ModelFileError(f"{where}: {target!r} is a reserved name and cannot name an input")
            if len(args) > 1 or kwargs or any(isinstance(a, fx.Node) for a in args):
                raise ModelFileError(f"{where}: an input takes at most a constant default value")
            call: Any = target
        elif op == "call_module":
            if target not in leaves:
                raise ModelFileError(f"{where} calls the unknown layer {str(target)[:80]!r}")
            used.add(target)
            call = target
        elif op == "get_attr":
            _check_path(target, f"{where}: attribute")
            if target not in buffer_names and (target.rpartition(".")[0] not in leaves or _tensor_attr(root, target) is None):
                raise ModelFileError(f"{where} reads the unknown tensor {target!r}")
            used.add(target)
            call = target
        elif op == "call_function":
            if target not in FUNCTIONS:
                raise ModelFileError(f"{where}: function {str(target)[:80]!r} is not in the whitelist of functions a "
                                     "model file may call")
            call = FUNCTIONS[target]
        elif op == "call_method":
            if target not in METHODS:
                raise ModelFileError(f"{where}: tensor method {str(target)[:80]!r} is not in the whitelist")
            if not args or not isinstance(args[0], fx.Node):
                raise ModelFileError(f"{where}: a method call needs the tensor it is called on")
            call = target
        else:
            if len(args) != 1 or kwargs:
                raise ModelFileError(f"{where}: the output node takes one argument")
            call = "output"
        env[name] = graph.create_node(op, call, args, kwargs, name=name)
    unused = (leaves | buffer_names) - used
    if unused:
        raise ModelFileError(f"the graph never uses {sorted(unused)[0]!r}")
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name=class_name)
    except Exception as exc:  # noqa: BLE001 - fx reports inconsistencies with several exception types
        raise ModelFileError(f"graph in model file is inconsistent: {type(exc).__name__}: {exc}") from exc
    shadowed = {n.target for n in gm.graph.nodes if n.op == "placeholder"} & set(gm.forward.__globals__)
    if shadowed:  # the generated code refers to a global by this name (none today beyond _RESERVED_INPUTS)
        raise ModelFileError(f"input name {sorted(shadowed)[0]!r} is reserved")
    return gm


def _any_spec(model: nn.Module) -> tuple[int, str, Any]:
    """(file version, key, JSON-able architecture) of a chain or a GraphModule."""
    if isinstance(model, fx.GraphModule):
        return GRAPH_VERSION, "graph", graph_spec(model)
    if isinstance(model, nn.Sequential):
        return VERSION, "spec", model_spec(model)
    raise ModelFileError(f"{type(model).__name__} cannot be stored: a model file holds an nn.Sequential chain or "
                         "the torch.fx.GraphModule that graph_compress makes")


def save_plain(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write the plain model (spec + tensors + JSON metadata) atomically: a chain or a compressed GraphModule."""
    version, key, spec = _any_spec(model)
    state = {
        "format": FORMAT,
        "version": version,
        key: json.dumps(spec),
        "meta": json.dumps(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_plain(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The plain model (in eval mode) and its metadata from a file written by `save_plain`.

    An `nn.Sequential` for a chain, a `torch.fx.GraphModule` for a residual or concatenating network.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read model file {path}: {load_error(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a bayescomp plain model file")
    version = state.get("version")
    if version not in VERSIONS:
        raise ModelFileError(f"{path} has format version {version}; this bayescomp reads {', '.join(map(str, VERSIONS))}")
    try:
        if version == GRAPH_VERSION:
            model: nn.Module = build_graph(json.loads(state["graph"]))
        else:
            model = build_from_spec(json.loads(state["spec"]))
        if not isinstance(state["state_dict"], dict):
            raise ModelFileError("the tensors are not a state_dict")
        model.load_state_dict(state["state_dict"])
        meta = json.loads(state["meta"])
    except ModelFileError as exc:
        raise ModelFileError(f"model file {path}: {exc}") from exc
    except (KeyError, TypeError, RuntimeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"model file {path} is inconsistent: {exc}") from exc
    return model.eval(), meta
