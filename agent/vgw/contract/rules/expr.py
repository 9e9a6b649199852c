"""The condition language of a ``trigger`` rule (README "Collection rules"), parsed by a grammar of our own.

Never ``eval``: the text is tokenised by one regular expression and parsed by recursive descent into a small
tree of frozen nodes, which :class:`Evaluator` walks. Limits are enforced before and while parsing: the text
is refused above :data:`MAX_CHARS` characters before any token is read, and nesting (each parenthesis,
function call and prefix operator opens a level) is refused above :data:`MAX_DEPTH` as it is met, so the
parser's recursion and the evaluator's are both bounded.

Grammar (lowest precedence first; comparisons do not chain)::

    condition := or
    or        := and ("or" and)*
    and       := not ("and" not)*
    not       := "not" not | compare
    compare   := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum       := term (("+" | "-") term)*
    term      := unary (("*" | "/") unary)*
    unary     := "-" unary | atom
    atom      := NUMBER | PATH | "abs" "(" sum ")" | "rising" "(" or ")" | "(" or ")"

Two types, checked while parsing: numbers (numbers, paths, arithmetic, ``abs``) and truth values
(comparisons, ``and``/``or``/``not``, ``rising``). A condition must be a truth value; ``Vehicle.Speed and 1``
does not parse.

Values at run time: a path with no numeric value yet (never received, or a text value) has no value; an
arithmetic with no value, or a division by zero, has no value; a comparison with no value is false
(README "Collection rules"). ``rising(c)`` is true at an evaluation where ``c`` is true and was false at the previous
one; before the first evaluation ``c`` counts as false (its paths had no value), so a condition already true
at its first evaluation rises there.

Inside, "no value" is NaN: a path without a value reads as NaN, an arithmetic that divides by zero or leaves
the finite floats gives NaN, and a comparison with NaN is false (``!=`` included), so the rules above hold.

Cost (docs/guarantees.md "Budgets"): the parser folds every constant subtree into one number, with the
same float operations in the same order as evaluation would (``Vehicle.Speed > 1+1+1`` is ``Vehicle.Speed >
3``: padding costs nothing), and :attr:`Condition.cost` counts the nodes left, which is what one evaluation
costs. :class:`Evaluator` compiles the folded tree once into one Python function of flat statements, one per
node; the source holds only operators and names we generate (numbers and paths are bound as constants, never
written into the text), so nothing of the document is ever executed as code.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vgw.base.errors import VgwError
from vgw.contract.rules.limits import MAX_CHARS, MAX_DEPTH

# A VSS path (COVESA VSS: dot-separated branch and leaf names under the root "Vehicle").
PATH_RE = re.compile(r"Vehicle(?:\.[A-Za-z][A-Za-z0-9_]*)+")
_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<num>[0-9]+(?:\.[0-9]+)?)"
    r"|(?P<name>[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*)"
    r"|(?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\))"
    r")"
)
_KEYWORDS = frozenset({"or", "and", "not"})
_FUNCTIONS = frozenset({"abs", "rising"})


class ConditionError(VgwError):
    """The condition text does not parse, is too long or too deeply nested. The message says where."""


# ---------------------------------------------------------------- the tree


@dataclass(frozen=True, slots=True)
class Num:
    value: float


@dataclass(frozen=True, slots=True)
class Path:
    path: str


@dataclass(frozen=True, slots=True)
class Neg:
    operand: NumExpr


@dataclass(frozen=True, slots=True)
class Abs:
    operand: NumExpr


@dataclass(frozen=True, slots=True)
class Arith:
    op: str
    left: NumExpr
    right: NumExpr


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: NumExpr
    right: NumExpr


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # "and" | "or"
    left: BoolExpr
    right: BoolExpr


@dataclass(frozen=True, slots=True)
class Not:
    operand: BoolExpr


@dataclass(frozen=True, slots=True)
class Rising:
    operand: BoolExpr
    index: int  # which rising() of the condition: its own memory slot in an Evaluator


NumExpr = Num | Path | Neg | Abs | Arith
BoolExpr = Compare | Logic | Not | Rising
_NUM_TYPES = (Num, Path, Neg, Abs, Arith)


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition: its text, its folded tree, the paths it reads, how many ``rising`` it holds, and
    ``cost``, the nodes of the folded tree (what one evaluation costs, besides its fixed cost)."""

    text: str
    root: BoolExpr
    paths: frozenset[str]
    risings: int
    cost: int


# ---------------------------------------------------------------- parsing


def parse_condition(text: str) -> Condition:
    """Parse ``text``. Raises :class:`ConditionError` (and nothing else) for any text that is not a condition."""
    if not isinstance(text, str):
        raise ConditionError("condition must be a string")
    # Size before anything else: a long text must cost nothing (README "Collection rules": at most 256 characters).
    if len(text) > MAX_CHARS:
        raise ConditionError(f"condition is {len(text)} characters, more than {MAX_CHARS}")
    parser = _Parser(text)
    root = _fold_bool(parser.parse())
    return Condition(text=text, root=root, paths=frozenset(parser.paths), risings=parser.risings,
                     cost=_count(root))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenise(text)
        self.pos = 0
        self.depth = 0
        self.paths: set[str] = set()
        self.risings = 0

    # -- token helpers

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _accept(self, *values: str) -> str | None:
        tok = self._peek()
        if tok is not None and tok[0] in ("op", "name") and tok[1] in values:
            self.pos += 1
            return tok[1]
        return None

    def _expect(self, value: str) -> None:
        if self._accept(value) is None:
            raise ConditionError(f"condition: expected {value!r} {self._where()}")

    def _where(self) -> str:
        tok = self._peek()
        return "at end of text" if tok is None else f"before {tok[1]!r}"

    def _enter(self) -> None:
        # Nesting is refused as it is met, before recursing: the parser's own stack stays bounded.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(f"condition nests deeper than {MAX_DEPTH} levels")

    def _leave(self) -> None:
        self.depth -= 1

    # -- grammar

    def parse(self) -> BoolExpr:
        if not self.tokens:
            raise ConditionError("condition is empty")
        node = self._bool(self._or())
        if self._peek() is not None:
            raise ConditionError(f"condition: unexpected {self._peek()[1]!r}")  # type: ignore[index]
        return node

    def _bool(self, node: NumExpr | BoolExpr) -> BoolExpr:
        if isinstance(node, _NUM_TYPES):
            raise ConditionError(f"condition: a number where a comparison is needed {self._where()}")
        return node

    def _num(self, node: NumExpr | BoolExpr) -> NumExpr:
        if not isinstance(node, _NUM_TYPES):
            raise ConditionError(f"condition: a comparison where a number is needed {self._where()}")
        return node

    def _or(self) -> NumExpr | BoolExpr:
        node = self._and()
        while self._accept("or"):
            node = Logic("or", self._bool(node), self._bool(self._and()))
        return node

    def _and(self) -> NumExpr | BoolExpr:
        node = self._not()
        while self._accept("and"):
            node = Logic("and", self._bool(node), self._bool(self._not()))
        return node

    def _not(self) -> NumExpr | BoolExpr:
        if self._accept("not"):
            self._enter()
            node = Not(self._bool(self._not()))
            self._leave()
            return node
        return self._compare()

    def _compare(self) -> NumExpr | BoolExpr:
        left = self._sum()
        op = self._accept("<", "<=", ">", ">=", "==", "!=")
        if op is None:
            return left
        node = Compare(op, self._num(left), self._num(self._sum()))
        if self._accept("<", "<=", ">", ">=", "==", "!="):
            raise ConditionError("condition: comparisons do not chain (write a < b and b < c)")
        return node

    def _sum(self) -> NumExpr | BoolExpr:
        node = self._term()
        while (op := self._accept("+", "-")) is not None:
            node = Arith(op, self._num(node), self._num(self._term()))
        return node

    def _term(self) -> NumExpr | BoolExpr:
        node = self._unary()
        while (op := self._accept("*", "/")) is not None:
            node = Arith(op, self._num(node), self._num(self._unary()))
        return node

    def _unary(self) -> NumExpr | BoolExpr:
        if self._accept("-"):
            self._enter()
            node = Neg(self._num(self._unary()))
            self._leave()
            return node
        return self._atom()

    def _atom(self) -> NumExpr | BoolExpr:
        tok = self._peek()
        if tok is None:
            raise ConditionError("condition ends too early")
        kind, value = tok
        if kind == "num":
            self.pos += 1
            return Num(float(value))
        if value == "(":
            self.pos += 1
            self._enter()
            inner = self._or()
            self._expect(")")
            self._leave()
            return inner
        if kind == "name" and value in _FUNCTIONS:
            self.pos += 1
            self._expect("(")
            self._enter()
            if value == "abs":
                node: NumExpr | BoolExpr = Abs(self._num(self._sum()))
            else:
                node = Rising(self._bool(self._or()), self.risings)
                self.risings += 1
            self._expect(")")
            self._leave()
            return node
        if kind == "name" and value not in _KEYWORDS:
            if not PATH_RE.fullmatch(value):
                raise ConditionError(f"condition: {value!r} is neither a VSS path (Vehicle.…) nor a function")
            self.pos += 1
            self.paths.add(value)
            return Path(value)
        raise ConditionError(f"condition: unexpected {value!r}")


def _tokenise(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos or m.lastgroup is None:
            raise ConditionError(f"condition: unexpected character {text[pos:pos + 1]!r} at {pos + 1}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return tokens


# ---------------------------------------------------------------- constant folding

NAN = math.nan
_ARITH: dict[str, Callable[[float, float], float]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _arith(op: str, left: float, right: float) -> float:
    """One arithmetic step as evaluation does it: NaN for no value, a division by zero or a non-finite result."""
    if op == "/":
        result = left / right if right else NAN
    else:
        result = _ARITH[op](left, right)
    return result if math.isfinite(result) else NAN


def _fold_num(node: NumExpr) -> NumExpr:
    if isinstance(node, Num | Path):
        return node
    if isinstance(node, Neg | Abs):
        inner = _fold_num(node.operand)
        if isinstance(inner, Num):
            return Num(-inner.value if isinstance(node, Neg) else abs(inner.value))
        return type(node)(inner)
    left, right = _fold_num(node.left), _fold_num(node.right)
    if isinstance(left, Num) and isinstance(right, Num):
        return Num(_arith(node.op, left.value, right.value))
    return Arith(node.op, left, right)


def _fold_bool(node: BoolExpr) -> BoolExpr:
    if isinstance(node, Compare):
        return Compare(node.op, _fold_num(node.left), _fold_num(node.right))
    if isinstance(node, Logic):
        return Logic(node.op, _fold_bool(node.left), _fold_bool(node.right))
    if isinstance(node, Not):
        return Not(_fold_bool(node.operand))
    return Rising(_fold_bool(node.operand), node.index)


def _count(node: NumExpr | BoolExpr) -> int:
    if isinstance(node, Num | Path):
        return 1
    if isinstance(node, Neg | Abs | Not | Rising):
        return 1 + _count(node.operand)
    return 1 + _count(node.left) + _count(node.right)


# ---------------------------------------------------------------- evaluation

_CMP_CODE = {"<": "{a} < {b}", "<=": "{a} <= {b}", ">": "{a} > {b}", ">=": "{a} >= {b}", "==": "{a} == {b}",
             "!=": "{a} < {b} or {a} > {b}"}  # NaN: every comparison false, != included


@functools.lru_cache(maxsize=256)
def _compile(condition: Condition) -> Callable[[Mapping[str, float], list[bool]], bool]:
    """One function ``f(values, previous) -> bool`` of flat statements, one per node of the folded tree: no
    nesting, whatever the tree's depth (the compiler's own limits never come into play). Stateless (the
    ``rising`` memory is passed in), so grants with the same condition share one (a consent change compiles
    each distinct condition once)."""
    env: dict[str, Any] = {"NAN": NAN}
    paths: dict[str, str] = {}
    lines: list[str] = []

    def name() -> str:
        return f"v{len(lines)}"

    def num(node: NumExpr) -> str:
        if isinstance(node, Num):
            const = f"C{len(env)}"
            env[const] = node.value
            return const
        if isinstance(node, Path):
            if node.path not in paths:
                paths[node.path] = f"p{len(paths)}"
                env[f"P{len(paths) - 1}"] = node.path
            return paths[node.path]
        if isinstance(node, Neg):
            x, out = num(node.operand), name()
            lines.append(f"{out} = -{x}")
            return out
        if isinstance(node, Abs):
            x, out = num(node.operand), name()
            lines.append(f"{out} = {x} if {x} >= 0 else -{x}")
            return out
        a, b = num(node.left), num(node.right)
        out = name()
        if node.op == "/":
            lines.append(f"{out} = {a} / {b} if {b} else NAN")
        else:
            lines.append(f"{out} = {a} {node.op} {b}")
        lines.append(f"if {out} - {out}: {out} = NAN")  # inf - inf and NaN - NaN are NaN (true): no value
        return out

    def boolean(node: BoolExpr) -> str:
        if isinstance(node, Compare):
            a, b = num(node.left), num(node.right)
            out = name()
            lines.append(f"{out} = " + _CMP_CODE[node.op].format(a=a, b=b))
            return out
        if isinstance(node, Logic):
            # Both sides are computed before either is used: every rising() inside sees every evaluation.
            a, b = boolean(node.left), boolean(node.right)
            out = name()
            lines.append(f"{out} = {a} {node.op} {b}")
            return out
        if isinstance(node, Not):
            x, out = boolean(node.operand), name()
            lines.append(f"{out} = not {x}")
            return out
        x, out = boolean(node.operand), name()
        lines.append(f"{out} = {x} and not previous[{node.index}]")
        lines.append(f"previous[{node.index}] = {x}")
        return out

    result = boolean(condition.root)
    head = [f"    {var} = get(P{i}, NAN)" for i, var in enumerate(paths.values())]
    source = "\n".join(["def condition(values, previous):", "    get = values.get", *head,
                        *(f"    {line}" for line in lines), f"    return {result}", ""])
    exec(compile(source, "<vgw condition>", "exec"), env)  # noqa: S102 - generated by us; no text of the document
    return env["condition"]  # type: ignore[no-any-return]


class Evaluator:
    """Evaluates one condition against the latest value of each path; holds each ``rising``'s memory.

    The condition is compiled once, here. Owned by one rule engine (one grant); not thread-safe by itself.
    """

    __slots__ = ("_function", "_previous", "condition")

    def __init__(self, condition: Condition) -> None:
        self.condition = condition
        self._function = _compile(condition)
        self._previous = [False] * condition.risings

    def __call__(self, values: Mapping[str, float]) -> bool:
        """The condition now; a path missing from ``values`` has no value."""
        return self._function(values, self._previous)

    def reset(self) -> None:
        """Forget every ``rising``'s memory (as before the first evaluation)."""
        self._previous = [False] * self.condition.risings
