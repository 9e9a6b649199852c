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
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vgw.errors import VgwError

MAX_CHARS = 256
MAX_DEPTH = 16

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
    """A parsed condition: its text, its tree, the paths it reads and how many ``rising`` it holds."""

    text: str
    root: BoolExpr
    paths: frozenset[str]
    risings: int


# ---------------------------------------------------------------- parsing


def parse_condition(text: str) -> Condition:
    """Parse ``text``. Raises :class:`ConditionError` (and nothing else) for any text that is not a condition."""
    if not isinstance(text, str):
        raise ConditionError("condition must be a string")
    # Size before anything else: a long text must cost nothing (README "Collection rules": at most 256 characters).
    if len(text) > MAX_CHARS:
        raise ConditionError(f"condition is {len(text)} characters, more than {MAX_CHARS}")
    parser = _Parser(text)
    root = parser.parse()
    return Condition(text=text, root=root, paths=frozenset(parser.paths), risings=parser.risings)


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


# ---------------------------------------------------------------- evaluation

_ARITH: dict[str, Callable[[float, float], float]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_CMP: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


class Evaluator:
    """Evaluates one condition against the latest value of each path; holds each ``rising``'s memory.

    Owned by one rule engine (one grant); not thread-safe by itself.
    """

    __slots__ = ("_previous", "condition")

    def __init__(self, condition: Condition) -> None:
        self.condition = condition
        self._previous = [False] * condition.risings

    def __call__(self, values: Mapping[str, float]) -> bool:
        return self._bool(self.condition.root, values)

    def _bool(self, node: BoolExpr, values: Mapping[str, float]) -> bool:
        if isinstance(node, Compare):
            left, right = self._num(node.left, values), self._num(node.right, values)
            if left is None or right is None:
                return False  # README "Collection rules": a comparison with a path that has no value yet is false
            return _CMP[node.op](left, right)
        if isinstance(node, Logic):
            # Both sides always run, so every rising() inside sees every evaluation (no short-circuit skips).
            left_b, right_b = self._bool(node.left, values), self._bool(node.right, values)
            return (left_b and right_b) if node.op == "and" else (left_b or right_b)
        if isinstance(node, Not):
            return not self._bool(node.operand, values)
        now = self._bool(node.operand, values)
        rose = now and not self._previous[node.index]
        self._previous[node.index] = now
        return rose

    def _num(self, node: NumExpr, values: Mapping[str, float]) -> float | None:
        if isinstance(node, Num):
            return node.value
        if isinstance(node, Path):
            return values.get(node.path)
        if isinstance(node, Neg):
            v = self._num(node.operand, values)
            return None if v is None else -v
        if isinstance(node, Abs):
            v = self._num(node.operand, values)
            return None if v is None else abs(v)
        left, right = self._num(node.left, values), self._num(node.right, values)
        if left is None or right is None:
            return None
        if node.op == "/":
            if right == 0:
                return None
            result = left / right
        else:
            result = _ARITH[node.op](left, right)
        return result if math.isfinite(result) else None
