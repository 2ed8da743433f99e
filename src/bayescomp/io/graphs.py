"""A compressed `torch.fx.GraphModule` as JSON (`graph_spec`) and back (`build_graph`), file version 2.

The description lists whitelisted modules (`io.layers.LAYERS`), buffers and nodes whose functions and
tensor methods come from an explicit whitelist (`FUNCTIONS`, `METHODS`). torch.fx turns a graph into
Python source and runs it, and it writes module paths, placeholder names and keyword names into that
source verbatim; so every such string is checked to be a plain identifier (or, inside a module path, a
decimal index) before anything is built. Whatever a file says, the generated `forward` can only call
whitelisted modules, functions and tensor methods, and `getattr` reads a tensor's shape only.

Token models added to the vocabulary (`TOKEN_FUNCTIONS`, `TOKEN_METHODS`, `TOKEN_TAGS`, with
`io.layers.TOKEN_LAYERS`): the size arithmetic of a reshape to computed shapes (``x.shape``, ``x.size(0)``,
``h // 7``, and `compress.channel_axes.full_shape` where a pruned tensor's original width is read) and
indexing with slices (``x[:, 0]``). `token_entries` lists what a description uses of it.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..compress.channel_axes import full_shape
from .layers import TOKEN_LAYERS, ModelFileError, build_layer, layer_entry

#: call_function targets a stored graph may use: pure tensor functions, by a stable name. These are the
#: functions graph_compress can emit (it re-emits the model's own element-wise ops, reductions over
#: spatial dimensions, barriers, cat and flatten); a test checks that the rule table of compress.rules stays inside it.
FUNCTIONS: dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "mul", "truediv", "neg", "getitem", "matmul", "gt", "ge", "lt", "le", "eq", "ne")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "add", "sub", "mul", "div", "true_divide", "cat", "concat", "concatenate", "flatten", "relu", "sigmoid",
        "tanh", "mean", "sum", "amax", "amin", "softmax", "log_softmax", "where", "reshape", "unsqueeze", "squeeze", "transpose",
        "permute", "matmul", "bmm", "chunk", "split", "unbind")},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in (
        "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
        "hardtanh", "softplus", "logsigmoid", "sigmoid", "tanh", "dropout", "dropout1d", "dropout2d", "max_pool1d",
        "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d",
        "adaptive_max_pool2d", "interpolate", "pad", "softmax", "log_softmax", "normalize",
        "scaled_dot_product_attention")},
    # size arithmetic of token models (TOKEN_FUNCTIONS); getattr only reads SHAPE_ATTRIBUTES
    "operator.floordiv": operator.floordiv, "getattr": getattr, "bayescomp.full_shape": full_shape,
}  # fmt: skip
#: function -> its name in FUNCTIONS (the first, where one function has two names)
FUNCTION_NAMES: dict[Any, str] = {fn: name for name, fn in reversed(FUNCTIONS.items())}

#: call_method targets (tensor methods) a stored graph may use
METHODS = frozenset({"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "mean", "sum", "amax", "amin",
                     "softmax", "log_softmax", "add", "sub", "mul", "div", "unsqueeze", "squeeze", "transpose",
                     "permute", "expand", "matmul", "bmm", "view", "reshape", "chunk", "split", "unbind", "float",
                     "to", "size", "dim"})

#: what a token model added to the vocabulary: a description that uses any of it is flagged (packed file) or
#: versioned (model file) as such, so that a reader from before refuses it by that mark
TOKEN_FUNCTIONS = frozenset({"operator.floordiv", "getattr", "bayescomp.full_shape"})
TOKEN_METHODS = frozenset({"size", "dim"})
#: argument tags beyond "node" and "tuple": a slice {"slice": [start, stop, step]}, and {"ellipsis": true}
TOKEN_TAGS = frozenset({"slice", "ellipsis"})
#: the attributes a stored `getattr` node may read (of a tensor): nothing that reaches code or other objects
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim"})

#: names the forward that torch.fx generates uses besides its nodes' (its first parameter, the getattr builtin and
#: torch.fx's own globals): an input (a parameter of that forward) must not shadow them
_RESERVED_INPUTS = frozenset({"self", "getattr", *getattr(fx.graph, "_custom_builtins", {"torch": None})})

OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_PATH_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_MAX_DEPTH = 16  # nesting of argument lists
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64}


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
    if isinstance(value, slice):
        return {"slice": [_slice_part(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise ModelFileError(f"{where}: an argument of type {type(value).__name__} cannot be stored in a model file")


def _slice_part(value: Any, where: str) -> Any:
    """A bound of a slice as JSON: None, an integer, or a node (a size computed in the graph)."""
    if value is None or isinstance(value, fx.Node) or (isinstance(value, int) and not isinstance(value, bool)):
        return _encode_arg(value, where)
    raise ModelFileError(f"{where}: a slice bound of type {type(value).__name__} cannot be stored in a model file")


def _is_bound(value: Any) -> bool:
    """A stored slice bound: null, an integer or a reference to a node."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, dict) and list(value) == ["node"])


def _decode_slice(inner: Any, env: dict[str, fx.Node], where: str) -> slice:
    if not isinstance(inner, list) or len(inner) != 3 or not all(_is_bound(v) for v in inner):
        raise ModelFileError(f"{where}: a slice is [start, stop, step], each null, an integer or a node; "
                             f"got {str(inner)[:80]}")
    return slice(*(_decode_arg(v, env, where) for v in inner))


def _check_getattr(args: tuple, kwargs: dict, where: str) -> None:
    """A stored `getattr` reads a shape attribute of a node's value: ``x.shape`` (torch.fx writes it so)."""
    if len(args) != 2 or kwargs or not isinstance(args[0], fx.Node) or args[1] not in SHAPE_ATTRIBUTES:
        shown = args[1] if len(args) == 2 else args
        raise ModelFileError(f"{where}: getattr may only read {', '.join(sorted(SHAPE_ATTRIBUTES))} of a value, "
                             f"not {str(shown)[:80]!r}")


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
        if tag == "slice":
            return _decode_slice(inner, env, where)
        if tag == "ellipsis" and inner is True:
            return Ellipsis
    raise ModelFileError(f"{where}: invalid argument {str(value)[:80]}")


def _tensor_attr(root: nn.Module, target: str) -> torch.Tensor | None:
    owner, _, attr = target.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    value = module._parameters.get(attr, module._buffers.get(attr))
    return value if isinstance(value, torch.Tensor) else None


def _tags(value: Any, depth: int = 0) -> set[str]:
    """The TOKEN_TAGS that a (JSON) node argument uses, looked for as deep as an argument may be nested."""
    if depth > _MAX_DEPTH + 1:
        return set()
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    found = set(value) & TOKEN_TAGS if isinstance(value, dict) else set()
    for item in items:
        found |= _tags(item, depth + 1)
    return found


def token_entries(arch: Any) -> list[str]:
    """The names of the token-model vocabulary an architecture uses (a chain's layer list or a graph description):
    layer types of `TOKEN_LAYERS`, functions of `TOKEN_FUNCTIONS`, methods of `TOKEN_METHODS`, argument tags of
    `TOKEN_TAGS`. Empty for what a file could hold before; safe on any JSON (a reader calls it before checking)."""
    layers, nodes = (arch.get("modules"), arch.get("nodes")) if isinstance(arch, dict) else (arch, [])
    used: set[str] = set()
    for entry in layers if isinstance(layers, list) else []:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if isinstance(kind, str) and kind in TOKEN_LAYERS:
            used.add(kind)
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict):
            continue
        op, target = node.get("op"), node.get("target")
        if isinstance(target, str) and (op == "call_function" and target in TOKEN_FUNCTIONS
                                        or op == "call_method" and target in TOKEN_METHODS):
            used.add(target)
        used |= _tags([node.get("args"), node.get("kwargs")])
    return sorted(used)


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
            modules.append(layer_entry(target, gm.get_submodule(target)))
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
            name = FUNCTION_NAMES.get(node.target)
            if name is None:
                raise ModelFileError(f"{where}: function {getattr(node.target, '__name__', node.target)!r} is not in "
                                     "the whitelist of functions a model file may call")
            if name == "getattr":
                _check_getattr(node.args, node.kwargs, where)
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
            name, module = build_layer(entry)
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
            if target == "getattr":
                _check_getattr(args, kwargs, where)
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
