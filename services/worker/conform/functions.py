"""Every conform function, vectorised over Arrow string arrays.

A conform maps each output attribute to a *value spec*: a field name, a list of field names
(joined by a space), or a function object (``{"function": "regexp", ...}``). ``Evaluator``
compiles the specs once per run (fields resolved, regular expressions compiled, arguments
checked) and then evaluates whole record batches with ``pyarrow.compute`` kernels.

Semantics follow the reference Machine (``openaddr/conform.py``): a missing value reads as the
empty string, an attribute that comes out empty is null. Where the reference is silent or
crashes, the choice made here is written next to the code.

Regular expressions are written by source authors for Python's ``re``. They run on RE2 (Arrow's
regex engine) after a translation that keeps Python's Unicode meaning of ``\\d``, ``\\w`` and
``\\s``; a pattern RE2 cannot run (look-around, back-references) falls back to Python ``re``
one value at a time. A catastrophic pattern there is stopped by the run's wall-clock limit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.worker.conform.arrays import filled_everywhere
from services.worker.conform.fields import FieldResolver
from services.worker.conform.layers import LAYER_ATTRIBUTES
from services.worker.errors import RunError

_NULL: Final = pa.scalar(None, pa.string())

#: Conform keys that hold value specs; everything else in a conform is reader metadata.
ATTRIBUTE_KEYS: Final[frozenset[str]] = frozenset(
    {name for names in LAYER_ATTRIBUTES.values() for name in names} | {"lon", "lat"}
)

_MPH_TO_KPH: Final = 1.609344


def _fail(where: str, message: str) -> RunError:
    return RunError(f"{where}: {message}", "conform_failed")


# --- array helpers -------------------------------------------------------------------------


def _text(values: pa.Array) -> pa.Array:
    """Strings with nulls read as '' (the reference saw missing values as empty CSV cells)."""
    if values.type != pa.string():
        values = values.cast(pa.string())
    return pc.fill_null(values, "") if values.null_count else values


def _blank_to_null(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ""), _NULL, values)


def _drop_point_zero(values: pa.Array) -> pa.Array:
    """'12.0' -> '12': numbers that went through a float column somewhere upstream."""
    return pc.if_else(pc.ends_with(values, ".0"), pc.utf8_slice_codeunits(values, 0, -2), values)


def _utf8_bytes(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64 rebased to this slice's rows, data bytes) of a null-free string array."""
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[
        values.offset : values.offset + len(values) + 1
    ].astype(np.int64)
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.empty(0, dtype=np.uint8)
    )
    return offsets, data


def _is_ascii(values: pa.Array) -> bool:
    """Whether a null-free string array holds only ASCII, by one numpy pass over its bytes."""
    offsets, data = _utf8_bytes(values)
    text = data[int(offsets[0]) : int(offsets[-1])] if len(offsets) else data[:0]
    return not len(text) or int(text.max()) < 0x80


def _affix_matches(values: pa.Array, affixes: pa.Array, at_end: bool) -> np.ndarray:
    """Row-wise ``value.startswith(affix)`` (or endswith), compared as UTF-8 bytes.

    Arrow's starts_with takes one pattern for the whole array; here every row has its own.
    Byte comparison is exact because UTF-8 never lets one character's encoding end inside
    another's.
    """
    value_offsets, value_data = _utf8_bytes(values)
    affix_offsets, affix_data = _utf8_bytes(affixes)
    value_lengths = np.diff(value_offsets)
    affix_lengths = np.diff(affix_offsets)
    fits = affix_lengths <= value_lengths
    rows = np.nonzero(fits & (affix_lengths > 0))[0]
    counts = affix_lengths[rows]
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    each_row = np.repeat(rows, counts)
    value_starts = value_offsets[1:] - affix_lengths if at_end else value_offsets[:-1]
    differs = (
        value_data[value_starts[each_row] + within]
        != affix_data[affix_offsets[:-1][each_row] + within]
    )
    mismatched = np.zeros(len(values), dtype=bool)
    mismatched[each_row[differs]] = True
    return np.asarray(fits & ~mismatched)


def _cut_bytes(values: pa.Array, head: np.ndarray, tail: np.ndarray) -> pa.Array:
    """Drop ``head[i]`` bytes from the start and ``tail[i]`` from the end of row ``i``."""
    offsets, data = _utf8_bytes(values)
    keep = np.diff(offsets) - head - tail
    new_offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    source = np.repeat(offsets[:-1] + head - new_offsets[:-1], keep) + np.arange(new_offsets[-1])
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(new_offsets.astype(np.int32)), pa.py_buffer(data[source])
    )


# --- regular expressions -------------------------------------------------------------------
#
# Python's str patterns are Unicode-aware (\d is any decimal digit, \s any Unicode space, \w
# any letter or number); RE2's shorthands are ASCII-only, and RE2 with Unicode classes runs
# ten times slower. So every pattern gets two RE2 translations: an ASCII one, exact for every
# row without a non-ASCII character the pattern's shorthands could match (the "gate"), and a
# Unicode one for the few rows that have such a character.

_ASCII_SPACE: Final = r"\x09-\x0d\x1c-\x20"  # Python's ASCII whitespace (RE2's \s lacks \v)
_SPACE_BODY: Final = _ASCII_SPACE + r"\x85\p{Z}"
_WORD_BODY: Final = r"\p{L}\p{N}_"
_ASCII_OUTSIDE: Final[dict[str, str]] = {
    "s": f"[{_ASCII_SPACE}]",
    "S": f"[^{_ASCII_SPACE}]",
    "Z": r"\z",
}
_ASCII_INSIDE: Final[dict[str, str]] = {"s": _ASCII_SPACE}
_UNICODE_OUTSIDE: Final[dict[str, str]] = {
    "d": r"\p{Nd}",
    "D": r"\P{Nd}",
    "w": f"[{_WORD_BODY}]",
    "W": f"[^{_WORD_BODY}]",
    "s": f"[{_SPACE_BODY}]",
    "S": f"[^{_SPACE_BODY}]",
    "Z": r"\z",
}
_UNICODE_INSIDE: Final[dict[str, str]] = {
    "d": r"\p{Nd}",
    "D": r"\P{Nd}",
    "w": _WORD_BODY,
    "s": _SPACE_BODY,
}
_UNICODE_ESCAPE: Final = re.compile(r"\\u([0-9A-Fa-f]{4})|\\U([0-9A-Fa-f]{8})")
_OPEN_MIN: Final = re.compile(r"\{,(\d+)\}")
_SHORTHANDS: Final = frozenset("dDwWsSbB")


class _Untranslatable(Exception):
    """The pattern means something RE2 would read differently; run it on Python re."""


@dataclass
class _Translation:
    outside: Mapping[str, str]
    inside: Mapping[str, str]
    parts: list[str] = field(default_factory=list)
    groups: int = 0
    shorthands: set[str] = field(default_factory=set)

    def escape(self, pattern: str, i: int, in_set: bool) -> int:
        if i + 1 >= len(pattern):
            raise _Untranslatable
        letter = pattern[i + 1]
        if letter in _SHORTHANDS:
            self.shorthands.add(letter)
        table = self.inside if in_set else self.outside
        if letter in table:
            self.parts.append(table[letter])
            return i + 2
        if letter.isdigit() or letter == "N" or (in_set and letter in "SW"):
            # back-references, octal escapes, \N{name}; negated classes nested in a set
            raise _Untranslatable
        unicode = _UNICODE_ESCAPE.match(pattern, i)
        if unicode:
            self.parts.append("\\x{" + (unicode.group(1) or unicode.group(2)) + "}")
            return unicode.end()
        self.parts.append(pattern[i : i + 2])
        return i + 2

    def charset(self, pattern: str, i: int) -> int:
        self.parts.append("[")
        i += 1
        if pattern.startswith("^", i):
            self.parts.append("^")
            i += 1
        if pattern.startswith("]", i):
            self.parts.append(r"\]")
            i += 1
        while i < len(pattern) and pattern[i] != "]":
            if pattern[i] == "\\":
                i = self.escape(pattern, i, in_set=True)
            else:
                # Python has no [:alpha:] classes; RE2 would read one, so "[" is escaped.
                self.parts.append(r"\[" if pattern[i] == "[" else pattern[i])
                i += 1
        if i >= len(pattern):
            raise _Untranslatable
        self.parts.append("]")
        return i + 1

    def run(self, pattern: str) -> str:
        """RE2 syntax, every capturing group named ``g1``, ``g2``... (extract_regex needs names)."""
        i = 0
        while i < len(pattern):
            char = pattern[i]
            bound = _OPEN_MIN.match(pattern, i) if char == "{" else None
            if char == "\\":
                i = self.escape(pattern, i, in_set=False)
            elif char == "[":
                i = self.charset(pattern, i)
            elif char == "(" and (pattern.startswith("(?P<", i) or not pattern.startswith("(?", i)):
                self.groups += 1
                self.parts.append(f"(?P<g{self.groups}>")
                i = pattern.index(">", i) + 1 if pattern.startswith("(?P<", i) else i + 1
            elif bound:
                self.parts.append("{0," + bound.group(1) + "}")  # Python's {,n}; RE2: literal
                i = bound.end()
            else:
                self.parts.append(char)
                i += 1
        return "".join(self.parts)


@functools.cache
def _non_ascii_text() -> str:
    """Every non-ASCII code point once, in order (built once per process, ~4 MB)."""
    points = np.arange(0x80, 0x110000, dtype="<u4")
    return points.tobytes().decode("utf-32-le", "surrogatepass")


@functools.cache
def _code_point_class(test: Callable[[str], bool]) -> str:
    """An RE2 class of the non-ASCII code points passing ``test``.

    ``filter`` calls ``test`` from C and numpy finds the runs, so this takes tens of
    milliseconds rather than the seconds a Python loop over 1.1M code points took.
    """
    passing = "".join(filter(test, _non_ascii_text()))
    encoded = passing.encode("utf-32-le", "surrogatepass")
    points = np.frombuffer(encoded, dtype="<u4").astype(np.int64)
    if not len(points):
        return ""
    breaks = np.flatnonzero(np.diff(points) != 1)
    starts = points[np.concatenate([[0], breaks + 1])].tolist()
    ends = points[np.concatenate([breaks, [len(points) - 1]])].tolist()
    return "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in zip(starts, ends, strict=True))


@functools.cache
def _gate(kinds: frozenset[str]) -> str:
    """A class of the characters on which Python and RE2's ASCII shorthands may disagree."""
    if kinds & set("wWbB"):
        return r"[^\x00-\x7f]"
    body = ""
    if kinds & set("dD"):
        body += _code_point_class(str.isdecimal)
    if kinds & set("sS"):
        body += _code_point_class(str.isspace)
    return f"[{body}]"


def _re2_accepts(pattern: str) -> bool:
    try:
        pc.match_substring_regex(pa.array([""], pa.string()), pattern)
    except pa.ArrowInvalid:
        return False
    return True


@dataclass(frozen=True)
class _Template:
    """A ``replace`` string: literal text and group numbers, in order."""

    parts: tuple[str | int, ...]

    def rewrite(self) -> str | None:
        """The RE2 rewrite string, or None when it needs a group past \\9 (RE2's limit)."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, int):
                if part > 9:
                    return None
                out.append(f"\\{part}")
            else:
                out.append(part.replace("\\", "\\\\"))
        return "".join(out)

    def expand(self, match: re.Match[str]) -> str:
        return "".join(
            (match.group(part) or "") if isinstance(part, int) else part for part in self.parts
        )


_TEMPLATE_TOKEN: Final = re.compile(
    r"\$\{(?P<braced>\d+)\}|\$(?P<dollar>\d+)|\\g<(?P<g>\w+)>|\\(?P<backslash>\d{1,2})"
    r"|\\(?P<escape>.)",
    re.DOTALL,
)
_ESCAPES: Final[dict[str, str]] = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "f": "\f",
    "v": "\v",
    "\\": "\\",
}


def _parse_template(text: str, regex: re.Pattern[str], where: str) -> _Template:
    """Read ``$1``, ``${1}`` (OpenAddresses style) and ``\\1``, ``\\g<1>`` (Python style)."""
    parts: list[str | int] = []
    position = 0
    for token in _TEMPLATE_TOKEN.finditer(text):
        parts.append(text[position : token.start()])
        position = token.end()
        if token.group("escape") is not None:
            letter = token.group("escape")
            parts.append(_ESCAPES.get(letter, "\\" + letter))
            continue
        name = token.group("braced") or token.group("dollar") or token.group("g")
        name = name or token.group("backslash")
        number = int(name) if name.isdigit() else regex.groupindex.get(name)
        if number is None or number > regex.groups:
            raise _fail(
                where, f"replace {text!r} refers to group {name!r}, which the pattern lacks"
            )
        parts.append(number)
    parts.append(text[position:])
    return _Template(tuple(p for p in parts if p != ""))


Kernel = Callable[[pa.Array, str], list[pa.Array]]


@dataclass(frozen=True)
class _Regex:
    python: re.Pattern[str]
    ascii: str | None  #: None: RE2 cannot run it faithfully, use Python per value
    unicode: str | None  #: for the rows the gate picks; None: Python per value for those
    #: The shorthands whose Unicode meaning the gate must catch; None: no gate needed.
    gate_kinds: frozenset[str] | None
    #: A narrower gate known for this pattern (built-in patterns), used instead of the kinds'.
    narrow_gate: str | None = None

    @property
    def gate(self) -> str | None:
        """Rows needing Unicode semantics; None: the ASCII pattern fits all rows.

        Built on first use (a tenth of a second per kind): all-ASCII data never needs it.
        """
        if self.gate_kinds is None:
            return None
        return self.narrow_gate or _gate(self.gate_kinds)

    @classmethod
    def compile(cls, pattern: str, where: str) -> _Regex:
        try:
            python = re.compile(pattern)
        except re.error as exc:
            raise _fail(where, f"pattern {pattern!r} does not compile: {exc}") from None
        ascii_, shorthands = cls._to_re2(pattern, python, _ASCII_OUTSIDE, _ASCII_INSIDE)
        if ascii_ is None:
            return cls(python, None, None, None)
        if not shorthands:
            return cls(python, ascii_, None, None)
        unicode, _ = cls._to_re2(pattern, python, _UNICODE_OUTSIDE, _UNICODE_INSIDE)
        return cls(python, ascii_, unicode, frozenset(shorthands))

    @staticmethod
    def _to_re2(
        pattern: str, python: re.Pattern[str], outside: Mapping[str, str], inside: Mapping[str, str]
    ) -> tuple[str | None, set[str]]:
        translation = _Translation(outside, inside)
        try:
            text = translation.run(pattern)
        except _Untranslatable:
            return None, set()
        if translation.groups != python.groups:
            return None, set()  # our reading of the pattern disagrees with Python's
        if python.groups == 0:
            text = f"(?P<g0>{text})"  # no groups: the whole match is the value
        return (text if _re2_accepts(text) else None), translation.shorthands

    def _run(self, values: pa.Array, kernel: Kernel, python: Kernel) -> list[pa.Array]:
        values = _text(values)
        if self.ascii is None:
            return python(values, "")
        if self.gate_kinds is None or _is_ascii(values):
            # The gate only matches non-ASCII characters, so ASCII text needs no gate pass.
            return kernel(values, self.ascii)
        unicode_rows = pc.match_substring_regex(values, self.gate)
        if not pc.any(unicode_rows).as_py():
            return kernel(values, self.ascii)
        subset = values.filter(unicode_rows)
        redone = kernel(subset, self.unicode) if self.unicode else python(subset, "")
        return [
            pc.replace_with_mask(whole, unicode_rows, part)
            for whole, part in zip(kernel(values, self.ascii), redone, strict=True)
        ]

    def groups(self, values: pa.Array) -> list[pa.Array]:
        """Each group of the first match ('' when it took no part or nothing matched)."""

        def kernel(texts: pa.Array, pattern: str) -> list[pa.Array]:
            found = pc.extract_regex(texts, pattern).flatten()  # no match: null in every group
            return [pc.fill_null(g, "") for g in found]

        def python(texts: pa.Array, _: str) -> list[pa.Array]:
            matches = [self.python.search(t) for t in texts.to_pylist()]
            count = max(self.python.groups, 1)
            return [
                pa.array(
                    [
                        ((m.group(n) or "") if self.python.groups else m.group(0)) if m else ""
                        for m in matches
                    ],
                    pa.string(),
                )
                for n in range(1, count + 1)
            ]

        return self._run(values, kernel, python)

    def search(self, values: pa.Array) -> pa.Array:
        """Concatenated groups of the first match (the whole match without groups), or ''."""
        groups = self.groups(values)
        return groups[0] if len(groups) == 1 else pc.binary_join_element_wise(*groups, "")

    def substitute(self, values: pa.Array, template: _Template) -> pa.Array:
        """Every match replaced (``re.sub``); values without a match stay as they are."""
        rewrite = template.rewrite()

        def kernel(texts: pa.Array, pattern: str) -> list[pa.Array]:
            if rewrite is None:
                return python(texts, pattern)
            return [pc.replace_substring_regex(texts, pattern, rewrite)]

        def python(texts: pa.Array, _: str) -> list[pa.Array]:
            subbed = [self.python.sub(template.expand, t) for t in texts.to_pylist()]
            return [pa.array(subbed, pa.string())]

        return self._run(values, kernel, python)[0]


# House numbers at the start of a value, as the reference recognises them: digits with an
# optional fraction ("123 1/2", "123-1/2"), two hyphenated digit groups (Queens style "69-15"),
# or digits and a letter ("123a", "123-a"). Written in Python syntax and translated like any
# source pattern so \d and \s keep their Unicode meaning.
_HOUSE_NUMBER: Final = r"\d+(?:[ -]\d/\d)?|\d+-\d+|\d+-?[A-Z]"
_UNIT_WORDS: Final = r"(?:UNIT|APARTMENT|APT\.?|SUITE|STE\.?|BUILDING|BLDG\.?|LOT)\s+|#"
#: Group 1: the prefixed number (reference prefixed_number); group 2: the rest (postfixed_street).
_NUMBER_AND_STREET: Final = rf"(?i)^(?:\s*({_HOUSE_NUMBER})\s+)?(.*)"
#: The number with the whitespace around it: what _NUMBER_AND_STREET's optional group matches.
_NUMBER_PREFIX: Final = rf"(?i)^\s*(?:{_HOUSE_NUMBER})\s+"
#: Rows where _NUMBER_PREFIX read with Unicode \\d and \\s may differ from its ASCII reading:
#: those whose first non-ASCII character comes after nothing but characters the prefix can
#: consume (spaces, digits, '-', '/', one letter), so a match attempt may reach it. Other
#: rows stop both readings on an ASCII character. Cheaper than the generic \\d/\\s gate,
#: which tests every character of every row against 1,000-odd code point ranges.
_NUMBER_PREFIX_GATE: Final = (
    r"^[\x09-\x0d\x1c-\x20/0-9-]*(?:[A-Za-z][\x09-\x0d\x1c-\x20/0-9-]*)?[^\x00-\x7f]"
)
#: Every character for which ``str.isspace()`` holds, i.e. what Python's ``\s`` matches.
_PYTHON_SPACES: Final = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_POSTFIXED_STREET_UNITS: Final = (
    rf"(?i)^(?:\s*(?:{_HOUSE_NUMBER})\s+)?(.+?)(?:\s+(?:{_UNIT_WORDS}).+)?$"
)
_POSTFIXED_UNIT: Final = rf"(?i)\s((?:{_UNIT_WORDS}).+)$"


# --- compilation ---------------------------------------------------------------------------


class _Env:
    """What one batch's evaluation can read: its columns and the variables set so far."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.length: int = batch.num_rows
        self.variables: dict[str, pa.Array] = {}
        #: Results shared between specs within this batch, keyed by (pattern, column).
        self.cache: dict[tuple[str, str], list[pa.Array]] = {}
        self._names = set(batch.schema.names)

    def column(self, name: str) -> pa.Array:
        if name not in self._names:
            # A field declared by the reader but absent from this batch is missing everywhere.
            return pa.nulls(self.length, pa.string())
        values = self.batch.column(name)
        return values if values.type == pa.string() else values.cast(pa.string())

    def variable(self, key: str) -> pa.Array:
        found = self.variables.get(key)
        return found if found is not None else pa.repeat(pa.scalar("", pa.string()), self.length)


Step = Callable[[_Env], pa.Array]
_Compiler = Callable[[Mapping[str, Any], "_Scope", str], Step]


def _variable_key(name: str) -> str:
    return "oa:" + name.casefold()


class _Scope:
    """Names a spec may read while compiling: source fields and ``oa:`` variables."""

    def __init__(self, resolver: FieldResolver) -> None:
        self.resolver = resolver
        self.variables: set[str] = set()

    def column_of(self, name: str) -> str | None:
        """The column ``name`` reads, or None when it reads a variable."""
        if name.casefold() in self.variables:
            return None
        return self.resolver.find(name)

    def reader(self, name: Any, where: str) -> Step:
        if not isinstance(name, str):
            raise _fail(where, f"a field name must be a string, not {name!r}")
        key = name.casefold()
        if key in self.variables:
            return lambda env: env.variable(key)
        try:
            column = self.resolver.resolve(name)
        except RunError as exc:
            raise _fail(where, str(exc)) from None
        return lambda env: env.column(column)


def _required(spec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in spec:
        raise _fail(where, f"function {spec['function']!r} needs {key!r}")
    value = spec[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _fail(
            where, f"{key!r} of function {spec['function']!r} has the wrong type: {value!r}"
        )
    return value


def _field_list(spec: Mapping[str, Any], scope: _Scope, where: str) -> list[Step]:
    names = _required(spec, "fields", list, where)
    if not names:
        raise _fail(where, f"function {spec['function']!r} needs at least one field")
    return [scope.reader(n, where) for n in names]


def _joined(readers: Sequence[Step], separator: str) -> Step:
    """Trimmed non-empty values joined by ``separator`` (the reference join function)."""

    def step(env: _Env) -> pa.Array:
        parts = [pc.utf8_trim_whitespace(_text(read(env))) for read in readers]
        if len(parts) == 1:
            return parts[0]
        if all(filled_everywhere(part) for part in parts):
            # The usual batch: nothing to skip, one kernel.
            return pc.binary_join_element_wise(*parts, separator)
        # binary_join_element_wise(null_handling="skip") drops all-null rows from its output in
        # pyarrow 26, so empties are skipped by hand: every non-empty part is written with the
        # separator in front of it and the first separator is cut off afterwards.
        pieces = [
            pc.if_else(pc.equal(p, ""), "", pc.binary_join_element_wise(separator, p, ""))
            for p in parts
        ]
        joined = pc.binary_join_element_wise(*pieces, "")
        return pc.utf8_slice_codeunits(joined, len(separator)) if separator else joined

    return step


def _compile_join(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    separator = spec.get("separator", " ")
    if not isinstance(separator, str):
        raise _fail(where, f"'separator' of function 'join' must be a string: {separator!r}")
    return _joined(_field_list(spec, scope, where), separator)


def _compile_regexp(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)
    regex = _Regex.compile(_required(spec, "pattern", str, where), where)
    replace = spec.get("replace")
    if replace is None or replace == "":
        # The reference tested ``if replace:``, so an empty replace means "extract".
        return lambda env: regex.search(read(env))
    if not isinstance(replace, str):
        raise _fail(where, f"'replace' of function 'regexp' must be a string: {replace!r}")
    template = _parse_template(replace, regex.python, where)
    return lambda env: regex.substitute(read(env), template)


@functools.cache
def _builtin(pattern: str) -> _Regex:
    return _Regex.compile(pattern, "built-in pattern")


def _compile_builtin(pattern: str, group: int) -> _Compiler:
    """A function reading one group of a built-in pattern.

    prefixed_number and postfixed_street are groups of one pattern; when both read the same
    column, the regex runs once per batch (Env.cache) instead of twice.
    """

    def compile_(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
        name = _required(spec, "field", str, where)
        read = scope.reader(name, where)
        column = scope.column_of(name)
        regex = _builtin(pattern)

        def step(env: _Env) -> pa.Array:
            if column is None:  # a variable changes between steps: nothing to share
                return regex.groups(read(env))[group]
            key = (pattern, column)
            if key not in env.cache:
                env.cache[key] = regex.groups(read(env))
            return env.cache[key][group]

        return step

    return compile_


@functools.cache
def _number_prefix() -> _Regex:
    return dataclasses.replace(_builtin(_NUMBER_PREFIX), narrow_gate=_NUMBER_PREFIX_GATE)


def _number_and_street(values: pa.Array) -> list[pa.Array]:
    """[prefixed_number, postfixed_street] of each value, as _NUMBER_AND_STREET's groups.

    Capturing groups send RE2 down its slow submatch path (~0.5 µs a row), so only the
    number prefix is matched, by a replace that needs no captures: what is left is the
    street, and the bytes removed are the prefix, whose trimmed text is the number. The
    prefixes are cut out of the values' own data buffer, no byte copied: offsets alternating
    row start / street start make a 2n-row array whose even rows are the prefixes.
    """
    values = _text(values)
    rest = _number_prefix().substitute(values, _Template(()))
    offsets, data = _utf8_bytes(values)
    rows = len(values)
    bounds = np.empty(2 * rows + 1, dtype=np.int64)
    bounds[0:-1:2] = offsets[:-1]
    bounds[1::2] = offsets[1:] - pc.binary_length(rest).to_numpy(zero_copy_only=False)
    bounds[-1] = offsets[-1]
    pieces = pa.StringArray.from_buffers(
        2 * rows,
        pa.py_buffer(bounds.astype(np.int32)),
        values.buffers()[2] or pa.py_buffer(b""),
    )
    prefixes = pc.take(pieces, pa.array(np.arange(0, 2 * rows, 2)))
    # The number starts with a digit and ends with a digit or letter: trimming Python's
    # whitespace off the prefix leaves exactly the number ('' where nothing was removed).
    number = pc.utf8_trim(prefixes, _PYTHON_SPACES)
    if (data[int(offsets[0]) : int(offsets[-1])] == 0x0A).any():
        rest = pc.replace_substring_regex(rest, r"(?s)\n.*", "")  # '.' stops at a newline
    return [number, rest]


def _compile_number_and_street(group: int) -> _Compiler:
    """prefixed_number (0) or postfixed_street (1): one pass per batch serves both."""

    def compile_(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
        name = _required(spec, "field", str, where)
        read = scope.reader(name, where)
        column = scope.column_of(name)

        def step(env: _Env) -> pa.Array:
            if column is None:  # a variable changes between steps: nothing to share
                return _number_and_street(read(env))[group]
            key = (_NUMBER_AND_STREET, column)
            if key not in env.cache:
                env.cache[key] = _number_and_street(read(env))
            return env.cache[key][group]

        return step

    return compile_


def _compile_postfixed_street(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    units = spec.get("may_contain_units", False)
    if not isinstance(units, bool):
        raise _fail(where, f"'may_contain_units' must be true or false: {units!r}")
    if units:
        return _compile_builtin(_POSTFIXED_STREET_UNITS, 0)(spec, scope, where)
    return _compile_number_and_street(1)(spec, scope, where)


@dataclass(frozen=True)
class _Placeholder:
    literal: str  #: format text since the previous placeholder
    index: int | None  #: 0-based field index; None when ``$n`` names no field


def _compile_format(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    readers = _field_list(spec, scope, where)
    text = _required(spec, "format", str, where)
    placeholders: list[_Placeholder] = []
    position = 0
    for token in re.finditer(r"\$([0-9]+)", text):
        number = int(token.group(1))
        index = number - 1 if 0 < number <= len(readers) else None
        placeholders.append(_Placeholder(text[position : token.start()], index))
        position = token.end()
    trailing = text[position:]

    def step(env: _Env) -> pa.Array:
        # Reference rules: the text before the first placeholder and after the last one is
        # written whenever any field has a value; the text before any other placeholder only
        # when that field has a value and an earlier one did too. Each value is trimmed and
        # loses a trailing ".0".
        values = [_drop_point_zero(pc.utf8_trim_whitespace(_text(r(env)))) for r in readers]
        present = [pc.not_equal(v, "") for v in values]
        pieces: list[Any] = []
        added: pa.Array | None = None
        for position_, placeholder in enumerate(placeholders):
            if placeholder.index is None:
                continue
            value, has = values[placeholder.index], present[placeholder.index]
            if position_ == 0:
                pieces.append(placeholder.literal)
            elif added is not None and placeholder.literal:
                pieces.append(pc.if_else(pc.and_(added, has), placeholder.literal, ""))
            pieces.append(value)
            added = has if added is None else pc.or_(added, has)
        if added is None:
            return pa.repeat(pa.scalar("", pa.string()), env.length)
        pieces.append(trailing)
        pieces = [p for p in pieces if not isinstance(p, str) or p]
        joined = pieces[0] if len(pieces) == 1 else pc.binary_join_element_wise(*pieces, "")
        return pc.if_else(added, joined, "")

    return step


def _compile_remove_affix(at_end: bool) -> _Compiler:
    def compile_(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
        read = scope.reader(_required(spec, "field", str, where), where)
        read_affix = scope.reader(_required(spec, "field_to_remove", str, where), where)

        def step(env: _Env) -> pa.Array:
            values, affixes = _text(read(env)), _text(read_affix(env))
            matched = _affix_matches(values, affixes, at_end)
            lengths = np.diff(_utf8_bytes(affixes)[0])
            none = np.zeros(len(values), dtype=np.int64)
            if at_end:
                # The reference ignores an empty postfix (but strips an empty prefix).
                matched &= lengths > 0
                cut = pc.utf8_rtrim(_cut_bytes(values, none, np.where(matched, lengths, 0)), " ")
            else:
                cut = pc.utf8_ltrim(_cut_bytes(values, np.where(matched, lengths, 0), none), " ")
            return pc.if_else(pa.array(matched), cut, values)

        return step

    return compile_


def _compile_first_non_empty(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    readers = _field_list(spec, scope, where)

    def step(env: _Env) -> pa.Array:
        candidates = []
        for read in readers:
            values = read(env)
            blank = pc.equal(pc.utf8_trim_whitespace(values), "")
            candidates.append(pc.if_else(blank, _NULL, values))
        return pc.fill_null(pc.coalesce(*candidates), "")

    return step


def _constant_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail(where, f"a constant must be a string or a number, not {value!r}")
    return value if isinstance(value, str) else str(value)


def _constant(text: str) -> Step:
    return lambda env: pa.repeat(pa.scalar(text, pa.string()), env.length)


def _compile_constant(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    if "value" not in spec:
        raise _fail(where, "function 'constant' needs 'value'")
    return _constant(_constant_text(spec["value"], where))


def _compile_map(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)
    mapping = _required(spec, "mapping", dict, where)
    keys = pa.array([str(k) for k in mapping], pa.string())
    targets = pa.array([_constant_text(v, where) for v in mapping.values()], pa.string())
    otherwise = _constant_text(spec["else"], where) if "else" in spec else None

    def step(env: _Env) -> pa.Array:
        # Values are trimmed before the lookup; an unmapped value becomes ``else`` when given
        # and is kept as it is otherwise.
        values = pc.utf8_trim_whitespace(_text(read(env)))
        mapped = pc.take(targets, pc.index_in(values, value_set=keys))
        return pc.coalesce(mapped, values if otherwise is None else otherwise)

    return step


def _compile_get(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)
    index = _required(spec, "index", int, where)

    def one(text: str | None) -> str | None:
        # A list-valued property reaches us as JSON text; Arrow cannot parse that, so this
        # is the per-value fallback. Anything but a JSON list has no item to get.
        if not text:
            return None
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if not isinstance(parsed, list) or not -len(parsed) <= index < len(parsed):
            return None
        item = parsed[index]
        if item is None:
            return None
        return item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)

    return lambda env: pa.array([one(t) for t in read(env).to_pylist()], pa.string())


_DECIMAL: Final = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$"


def _compile_mph_to_kph(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)

    def step(env: _Env) -> pa.Array:
        # Rounded to whole km/h, as speed limits are posted; non-numbers become empty.
        values = pc.utf8_trim_whitespace(_text(read(env)))
        numeric = pc.if_else(pc.match_substring_regex(values, _DECIMAL), values, _NULL)
        kph = pc.round(pc.multiply(numeric.cast(pa.float64()), _MPH_TO_KPH), round_mode="half_up")
        return pc.fill_null(kph.cast(pa.int64()).cast(pa.string()), "")

    return step


def _compile_chain(spec: Mapping[str, Any], scope: _Scope, where: str) -> Step:
    variable = _required(spec, "variable", str, where)
    functions = _required(spec, "functions", list, where)
    if not functions:
        raise _fail(where, "function 'chain' needs at least one function")
    key = _variable_key(variable)
    scope.variables.add(key)  # readable from the first step on, as '' until written
    steps = [
        _compile_spec(f, scope, f"{where}, chain step {n}") for n, f in enumerate(functions, 1)
    ]

    def step(env: _Env) -> pa.Array:
        env.variables.pop(key, None)
        result = env.variable(key)
        for each in steps:
            result = _text(each(env))
            env.variables[key] = result
        return result

    return step


_FUNCTIONS: Final[dict[str, _Compiler]] = {
    "join": _compile_join,
    "regexp": _compile_regexp,
    "format": _compile_format,
    "prefixed_number": _compile_number_and_street(0),
    "postfixed_street": _compile_postfixed_street,
    "postfixed_unit": _compile_builtin(_POSTFIXED_UNIT, 0),
    "remove_prefix": _compile_remove_affix(at_end=False),
    "remove_postfix": _compile_remove_affix(at_end=True),
    "first_non_empty": _compile_first_non_empty,
    "chain": _compile_chain,
    "constant": _compile_constant,
    "map": _compile_map,
    "get": _compile_get,
    "mph_to_kph": _compile_mph_to_kph,
}


def _compile_spec(spec: Any, scope: _Scope, where: str) -> Step:
    if spec is None:
        return lambda env: pa.repeat(pa.scalar("", pa.string()), env.length)
    if isinstance(spec, str):
        return scope.reader(spec, where)
    if isinstance(spec, list):
        if not spec:
            raise _fail(where, "an empty list of fields")
        return _joined([scope.reader(name, where) for name in spec], " ")
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return _constant(str(spec))  # "accuracy": 3
    if isinstance(spec, Mapping):
        name = spec.get("function")
        compiler = _FUNCTIONS.get(name) if isinstance(name, str) else None
        if compiler is None:
            known = ", ".join(sorted(_FUNCTIONS))
            raise _fail(where, f"unknown function {name!r}; known functions: {known}")
        return compiler(spec, scope, where)
    raise _fail(where, f"cannot read value spec {spec!r}")


_ACCURACY_CODE: Final = re.compile(r"[1-5]")


def _is_accuracy_code(attribute: str, spec: Any) -> bool:
    """The schema allows the accuracy code as a string: "3" is a constant, not a field."""
    return (
        attribute == "accuracy" and isinstance(spec, str) and bool(_ACCURACY_CODE.fullmatch(spec))
    )


def attribute_specs(conform: Mapping[str, Any]) -> dict[str, Any]:
    """The value specs of a conform (attributes, ``lon``, ``lat``), in conform order."""
    specs: dict[str, Any] = {}
    for key, spec in conform.items():
        if key in ATTRIBUTE_KEYS:
            specs[key] = spec
    return specs


def _collect(spec: Any, names: set[str], variables: set[str]) -> None:
    if isinstance(spec, str):
        names.add(spec)
    elif isinstance(spec, list):
        for item in spec:
            _collect(item, names, variables)
    elif isinstance(spec, Mapping):
        for key in ("field", "field_to_remove"):
            if isinstance(spec.get(key), str):
                names.add(spec[key])
        for name in spec.get("fields") or ():
            if isinstance(name, str):
                names.add(name)
        if spec.get("function") == "chain" and isinstance(spec.get("variable"), str):
            variables.add(_variable_key(spec["variable"]))
            for step in spec.get("functions") or ():
                _collect(step, names, variables)


def referenced_fields(conform: Mapping[str, Any]) -> set[str]:
    """Every source field name any attribute/lon/lat spec reads, as the conform spells it."""
    names: set[str] = set()
    variables: set[str] = set()
    for key, spec in attribute_specs(conform).items():
        if not _is_accuracy_code(key, spec):
            _collect(spec, names, variables)
        variables.add(_variable_key(key))
    return {n for n in names if n.casefold() not in variables}


class Evaluator:
    """Compiled value specs of one conform over one source schema."""

    def __init__(self, specs: Mapping[str, Any], field_names: Sequence[str]) -> None:
        scope = _Scope(FieldResolver(field_names))
        self._steps: list[tuple[str, Step]] = []
        for attribute, spec in specs.items():
            if _is_accuracy_code(attribute, spec):
                spec = int(spec)
            self._steps.append((attribute, _compile_spec(spec, scope, f"attribute {attribute!r}")))
            # Later specs may read an earlier attribute's value as field "oa:<attribute>".
            scope.variables.add(_variable_key(attribute))

    @property
    def attributes(self) -> list[str]:
        return [attribute for attribute, _ in self._steps]

    def evaluate(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """Attribute -> ``pa.string()`` array as long as the batch, null where empty."""
        env = _Env(batch)
        out: dict[str, pa.Array] = {}
        for attribute, step in self._steps:
            values = _text(step(env))
            env.variables[_variable_key(attribute)] = values
            out[attribute] = _blank_to_null(values)
        return out
