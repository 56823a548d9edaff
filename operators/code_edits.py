"""Edits to model source code: SEARCH/REPLACE blocks (what an LLM writes, and what the heuristic
mutator writes too, so both go through one applier), a full-rewrite fallback, and the heuristic
code mutator, the offline default.

An edit is text in the format LLM coding tools use:

    <<<<<<< SEARCH
    nn.LazyConv1d(25, 3, stride=2, padding=1),
    =======
    nn.LazyConv1d(38, 3, stride=2, padding=1),
    >>>>>>> REPLACE

Each SEARCH must occur exactly once in the parent's source; an edit that does not apply says
which block and why, so the proposer can be told and try again (or rewrite the whole file).

The heuristic mutator works on the network's trunk, the first `nn.Sequential(...)` assigned in
`__init__`, as a list of layer constructor calls: change a width, a kernel or a stride, drop or
insert a block, swap an activation, or scale every width by one factor (the width multiplier of
MobileNet and EfficientNet: it moves a good network along the size axis while keeping its shape,
which is how a front gets filled in between a big accurate member and a small one); crossover joins
one parent's convolutions before a cut with the other's after it. Layers it writes are lazy
(`LazyConv1d`, `LazyLinear`, `LazyBatchNorm1d`), so a change of width never leaves a later layer
with the wrong input size. Source it cannot read that way (free-form code an LLM wrote) gets an
integer of a layer constructor changed instead.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from dataclasses import dataclass

EDIT_BLOCK = re.compile(r"<<<<<<< SEARCH\n(.*?)\n?=======\n(.*?)\n?>>>>>>> REPLACE", re.DOTALL)
ACTIVATIONS = ("ReLU", "GELU", "SiLU", "Tanh", "ELU")
WIDTH_FACTORS = (0.5, 0.67, 0.8, 1.25, 1.5, 2.0)
SCALE_FACTORS = (0.7, 0.8, 0.9, 1.1, 1.25)  # every width at once: a step along the size axis
KERNELS = (1, 3, 5, 7, 9)
MAX_TRIES = 50


class EditError(ValueError):
    """An edit does not apply to the source it was written for (the message says which block)."""


@dataclass(frozen=True)
class CodeChild:
    """A child's source, the edit that made it from its first parent, and what changed."""
    source: str
    edit: str
    change: str


def source_key(source: str) -> str:
    """The same program whatever its comments and layout (the breeder's duplicate check)."""
    try:
        text = ast.dump(ast.parse(source))
    except SyntaxError:
        text = source
    return hashlib.sha256(text.encode()).hexdigest()


def parse_edits(text: str) -> list[tuple[str, str]]:
    """The (search, replace) blocks of an edit text, in order."""
    return [(search, replace) for search, replace in EDIT_BLOCK.findall(text)]


def apply_edits(source: str, text: str) -> str:
    """`source` with every block of `text` applied in order (`EditError` if one does not)."""
    blocks = parse_edits(text)
    if not blocks:
        raise EditError("no SEARCH/REPLACE block found (write <<<<<<< SEARCH, the exact lines, "
                        "=======, the new lines, >>>>>>> REPLACE)")
    for number, (search, replace) in enumerate(blocks, start=1):
        found = source.count(search)
        if found != 1:
            where = "does not occur" if found == 0 else f"occurs {found} times"
            raise EditError(f"block {number}: its SEARCH text {where} in the parent's source; "
                            "copy lines from the source exactly, with enough of them to be unique")
        source = source.replace(search, replace)
    return source


def edit_text(search: str, replace: str) -> str:
    return f"<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE"


# -- the trunk: the first nn.Sequential in __init__, as layer calls ----------------------------

def _layer_name(call: ast.expr) -> str | None:
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _trunk(source: str) -> tuple[ast.Call, list[ast.Call]] | None:
    """The trunk's `nn.Sequential(...)` call and its layer calls, or None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _layer_name(node) == "Sequential" and node.args \
                and all(_layer_name(a) for a in node.args):
            return node, list(node.args)
    return None


def _call(name: str, *args, **kwargs) -> ast.Call:
    return ast.Call(ast.Attribute(ast.Name("nn", ast.Load()), name, ast.Load()),
                    [ast.Constant(a) for a in args],
                    [ast.keyword(k, ast.Constant(v)) for k, v in kwargs.items()])


def _int(node: ast.expr | None, default: int) -> int:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, int) \
        else default


def _keyword(call: ast.Call, name: str, position: int, default: int) -> int:
    for keyword in call.keywords:
        if keyword.arg == name:
            return _int(keyword.value, default)
    return _int(call.args[position], default) if len(call.args) > position else default


def _conv(call: ast.Call) -> dict | None:
    """A convolution's out channels, kernel, stride and padding (Conv1d or LazyConv1d)."""
    name = _layer_name(call)
    if name not in ("Conv1d", "LazyConv1d"):
        return None
    shift = 1 if name == "Conv1d" else 0  # Conv1d(in, out, kernel, stride, padding)
    return {"out": _keyword(call, "out_channels", shift, 0),
            "kernel": _keyword(call, "kernel_size", shift + 1, 0),
            "stride": _keyword(call, "stride", shift + 2, 1),
            "padding": _keyword(call, "padding", shift + 3, 0)}


def _lazy_conv(out: int, kernel: int, stride: int, padding: int) -> ast.Call:
    return _call("LazyConv1d", out, kernel, stride=stride, padding=padding)


def _hidden(call: ast.Call) -> int | None:
    """A linear layer's width (Linear or LazyLinear)."""
    name = _layer_name(call)
    if name == "LazyLinear":
        return _keyword(call, "out_features", 0, 0)
    if name == "Linear":
        return _keyword(call, "out_features", 1, 0)
    return None


def signal_length(layers: list[ast.Call], length: int) -> int:
    """The signal's length after the trunk's convolutions and pools (0 or less: it vanished)."""
    for call in layers:
        conv, name = _conv(call), _layer_name(call)
        if conv is not None:
            length = (length + 2 * conv["padding"] - conv["kernel"]) // max(conv["stride"], 1) + 1
        elif name in ("MaxPool1d", "AvgPool1d"):
            kernel = _keyword(call, "kernel_size", 0, 2)
            length = (length - kernel) // _keyword(call, "stride", 1, kernel) + 1
        if name == "Flatten" or length < 1:
            break
    return length


def _render(layers: list[ast.Call], indent: str) -> str:
    inner = "".join(f"{indent}    {ast.unparse(layer)},\n" for layer in layers)
    return f"nn.Sequential(\n{inner}{indent})"


def _indent(source: str, call: ast.Call) -> str:
    line = source.splitlines()[call.lineno - 1]
    return line[:len(line) - len(line.lstrip())]


def _with_trunk(source: str, call: ast.Call, layers: list[ast.Call], change: str) -> CodeChild:
    search = ast.get_source_segment(source, call)
    replace = _render(layers, _indent(source, call))
    edit = edit_text(search, replace)
    return CodeChild(apply_edits(source, edit), edit, change)


class CodeMutator:
    """The heuristic code mutator (see the module docstring). `length` is the input signal's
    length, so a child whose signal would vanish in its convolutions is never proposed."""

    def __init__(self, length: int):
        self.length = length

    def _valid(self, layers: list[ast.Call]) -> bool:
        flatten = [i for i, c in enumerate(layers) if _layer_name(c) == "Flatten"]
        return signal_length(layers, self.length) >= 1 and (not flatten or any(
            _hidden(c) is not None for c in layers[flatten[0]:]))

    def _moves(self, rng: random.Random, layers: list[ast.Call]) -> tuple[list[ast.Call], str]:
        """One random change of the layer list, and its description."""
        layers = list(layers)
        last_linear = max((i for i, c in enumerate(layers) if _hidden(c) is not None),
                          default=len(layers))
        convs = [i for i, c in enumerate(layers) if _conv(c) is not None]
        hidden = [i for i, c in enumerate(layers) if _hidden(c) is not None and i != last_linear]
        activations = [i for i, c in enumerate(layers) if _layer_name(c) in ACTIVATIONS]
        flatten = next((i for i, c in enumerate(layers) if _layer_name(c) == "Flatten"),
                       len(layers))
        move = rng.choice(["width", "width", "scale", "kernel", "stride", "drop", "insert",
                           "activation"])
        if move == "width" and convs + hidden:
            i = rng.choice(convs + hidden)
            conv = _conv(layers[i])
            old = conv["out"] if conv else _hidden(layers[i])
            new = max(1, round(old * rng.choice(WIDTH_FACTORS)))
            layers[i] = _lazy_conv(new, conv["kernel"], conv["stride"], conv["padding"]) \
                if conv else _call("LazyLinear", new)
            return layers, f"layer {i}: width {old} -> {new}"
        if move == "scale" and convs + hidden:
            factor = rng.choice(SCALE_FACTORS)
            for i in convs + hidden:
                conv = _conv(layers[i])
                old = conv["out"] if conv else _hidden(layers[i])
                new = max(1, round(old * factor))
                layers[i] = _lazy_conv(new, conv["kernel"], conv["stride"], conv["padding"]) \
                    if conv else _call("LazyLinear", new)
            return layers, f"every width scaled by {factor}"
        if move == "kernel" and convs:
            i = rng.choice(convs)
            conv = _conv(layers[i])
            kernel = rng.choice([k for k in KERNELS if k != conv["kernel"]])
            layers[i] = _lazy_conv(conv["out"], kernel, conv["stride"], kernel // 2)
            return layers, f"layer {i}: kernel {conv['kernel']} -> {kernel}"
        if move == "stride" and convs:
            i = rng.choice(convs)
            conv = _conv(layers[i])
            stride = 1 if conv["stride"] > 1 else 2
            layers[i] = _lazy_conv(conv["out"], conv["kernel"], stride, conv["padding"])
            return layers, f"layer {i}: stride {conv['stride']} -> {stride}"
        if move == "drop" and len(convs + hidden) > 1:
            i = rng.choice(convs + hidden)
            end = i + 2 if i + 1 < len(layers) and _layer_name(layers[i + 1]) in ACTIVATIONS \
                else i + 1
            name = _layer_name(layers[i])
            del layers[i:end]
            return layers, f"layer {i} ({name}) dropped"
        if move == "activation" and activations:
            i = rng.choice(activations)
            old = _layer_name(layers[i])
            new = rng.choice([a for a in ACTIVATIONS if a != old])
            layers[i] = _call(new)
            return layers, f"layer {i}: {old} -> {new}"
        # insert: a copy of a convolution block, a pool, a norm, or a hidden layer
        kind = rng.choice(["conv", "pool", "norm", "hidden"])
        if kind == "conv" and convs:
            source = rng.choice(convs)
            conv = _conv(layers[source])
            at = rng.randrange(0, flatten + 1) if flatten < len(layers) else source
            block = [_lazy_conv(conv["out"], conv["kernel"], 1, conv["kernel"] // 2),
                     _call(rng.choice(ACTIVATIONS))]
            layers[at:at] = block
            return layers, f"a convolution block ({conv['out']} channels) inserted at {at}"
        if kind == "pool" and activations and activations[0] < flatten:
            at = rng.choice([i for i in activations if i < flatten]) + 1
            layers.insert(at, _call(rng.choice(["MaxPool1d", "AvgPool1d"]), 2))
            return layers, f"a pool inserted at {at}"
        if kind == "norm" and convs:
            at = rng.choice(convs) + 1
            layers.insert(at, _call("LazyBatchNorm1d"))
            return layers, f"a batch norm inserted at {at}"
        width = rng.choice([16, 32, 64, 128])
        at = min(flatten + 1, len(layers) - 1) if flatten < len(layers) else len(layers) - 1
        layers[at:at] = [_call("LazyLinear", width), _call("ReLU")]
        return layers, f"a hidden layer of {width} inserted at {at}"

    def mutate(self, rng: random.Random, source: str) -> CodeChild:
        """One change: of the trunk where the source has one, else of an integer argument."""
        trunk = _trunk(source)
        if trunk is None:
            return self._mutate_literal(rng, source)
        call, layers = trunk
        for _ in range(MAX_TRIES):
            changed, change = self._moves(rng, layers)
            if self._valid(changed) and [ast.dump(c) for c in changed] != \
                    [ast.dump(c) for c in layers]:
                return _with_trunk(source, call, changed, change)
        return self._mutate_literal(rng, source)

    def crossover(self, rng: random.Random, first: str, second: str) -> CodeChild:
        """The first parent's trunk up to a cut among its convolutions, then the second's from a
        cut among its own (both cuts at block boundaries); a mutation of the first where either
        has no trunk or no cut gives a valid child."""
        one, two = _trunk(first), _trunk(second)
        if one is None or two is None:
            return self.mutate(rng, first)
        call, layers = one
        other = two[1]
        cuts = lambda ls: [i for i, c in enumerate(ls) if _conv(c) is not None  # noqa: E731
                           or _layer_name(c) == "Flatten"]
        parents = ([ast.dump(c) for c in layers], [ast.dump(c) for c in other])
        for _ in range(MAX_TRIES):
            if not cuts(layers) or not cuts(other):
                break
            a, b = rng.choice(cuts(layers)), rng.choice(cuts(other))
            child = layers[:a] + other[b:]
            child = [_lazy_conv(**_conv(c)) if _conv(c) else c for c in child]
            if self._valid(child) and [ast.dump(c) for c in child] not in parents:
                return _with_trunk(first, call, child, f"crossover: the first parent's layers "
                                   f"before {a}, then the second's from {b}")
        return self.mutate(rng, first)

    def _mutate_literal(self, rng: random.Random, source: str) -> CodeChild:
        """An integer argument (≥ 2) of an `nn.*` call scaled: for source without a trunk."""
        tree = ast.parse(source)
        found = [(node, i) for node in ast.walk(tree) if _layer_name(node)
                 for i, arg in enumerate(node.args)
                 if isinstance(arg, ast.Constant) and isinstance(arg.value, int)
                 and not isinstance(arg.value, bool) and arg.value >= 2]
        if not found:
            raise EditError("no layer with an integer argument to mutate")
        node, i = rng.choice(found)
        old = node.args[i].value
        new = max(1, round(old * rng.choice(WIDTH_FACTORS)))
        search = ast.get_source_segment(source, node)
        node.args[i] = ast.Constant(new)
        edit = edit_text(search, ast.unparse(node))
        try:
            return CodeChild(apply_edits(source, edit), edit,
                             f"{_layer_name(node)} argument {i}: {old} -> {new}")
        except EditError:  # that call's text occurs twice: rewrite the whole file instead
            child = ast.unparse(tree)
            return CodeChild(child, "", f"{_layer_name(node)} argument {i}: {old} -> {new} "
                             "(full rewrite)")
