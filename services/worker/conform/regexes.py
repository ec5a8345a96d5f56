"""Source authors' regular expressions (Python ``re`` syntax) run on Arrow's RE2 kernels.

Python's str patterns are Unicode-aware (\\d is any decimal digit, \\s any Unicode space, \\w
any letter or number); RE2's shorthands are ASCII-only, and RE2 with Unicode classes runs
ten times slower. So every pattern gets two RE2 translations: an ASCII one, exact for every
row without a non-ASCII character the pattern's shorthands could match (the "gate"), and a
Unicode one for the few rows that have such a character. A pattern RE2 cannot run
faithfully (look-around, back-references) runs on Python ``re`` one value at a time.

Also here: ``replace`` templates (``$1`` and ``\\1`` styles) and the built-in patterns of
prefixed_number, postfixed_street and postfixed_unit. Errors in a source's pattern or
template are :class:`PatternError`; the conform compiler says which attribute they are in.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.worker.conform.arrays import as_text, is_ascii, utf8_bytes


class PatternError(ValueError):
    """A source's pattern does not compile, or its replace template names a missing group."""


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
def _non_asciias_text() -> str:
    """Every non-ASCII code point once, in order (built once per process, ~4 MB)."""
    points = np.arange(0x80, 0x110000, dtype="<u4")
    return points.tobytes().decode("utf-32-le", "surrogatepass")


@functools.cache
def _code_point_class(test: Callable[[str], bool]) -> str:
    """An RE2 class of the non-ASCII code points passing ``test``.

    ``filter`` calls ``test`` from C and numpy finds the runs, so this takes tens of
    milliseconds rather than the seconds a Python loop over 1.1M code points took.
    """
    passing = "".join(filter(test, _non_asciias_text()))
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
class Template:
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


def parse_template(text: str, regex: re.Pattern[str]) -> Template:
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
            raise PatternError(
                f"replace {text!r} refers to group {name!r}, which the pattern lacks"
            )
        parts.append(number)
    parts.append(text[position:])
    return Template(tuple(p for p in parts if p != ""))


Kernel = Callable[[pa.Array, str], list[pa.Array]]


@dataclass(frozen=True)
class Regex:
    """One pattern compiled for Python and translated for RE2; applied to whole arrays."""

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
    def compile(cls, pattern: str) -> Regex:
        try:
            python = re.compile(pattern)
        except re.error as exc:
            raise PatternError(f"pattern {pattern!r} does not compile: {exc}") from None
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
        values = as_text(values)
        if self.ascii is None:
            return python(values, "")
        if self.gate_kinds is None or is_ascii(values):
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

    def substitute(self, values: pa.Array, template: Template) -> pa.Array:
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
HOUSE_NUMBER: Final = r"\d+(?:[ -]\d/\d)?|\d+-\d+|\d+-?[A-Z]"
UNIT_WORDS: Final = r"(?:UNIT|APARTMENT|APT\.?|SUITE|STE\.?|BUILDING|BLDG\.?|LOT)\s+|#"
#: Group 1: the prefixed number (reference prefixed_number); group 2: the rest (postfixed_street).
NUMBER_AND_STREET: Final = rf"(?i)^(?:\s*({HOUSE_NUMBER})\s+)?(.*)"
#: The number with the whitespace around it: what NUMBER_AND_STREET's optional group matches.
NUMBER_PREFIX: Final = rf"(?i)^\s*(?:{HOUSE_NUMBER})\s+"
#: Rows where NUMBER_PREFIX read with Unicode \\d and \\s may differ from its ASCII reading:
#: those whose first non-ASCII character comes after nothing but characters the prefix can
#: consume (spaces, digits, '-', '/', one letter), so a match attempt may reach it. Other
#: rows stop both readings on an ASCII character. Cheaper than the generic \\d/\\s gate,
#: which tests every character of every row against 1,000-odd code point ranges.
NUMBER_PREFIX_GATE: Final = (
    r"^[\x09-\x0d\x1c-\x20/0-9-]*(?:[A-Za-z][\x09-\x0d\x1c-\x20/0-9-]*)?[^\x00-\x7f]"
)
#: Every character for which ``str.isspace()`` holds, i.e. what Python's ``\s`` matches.
PYTHON_SPACES: Final = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
POSTFIXED_STREET_UNITS: Final = (
    rf"(?i)^(?:\s*(?:{HOUSE_NUMBER})\s+)?(.+?)(?:\s+(?:{UNIT_WORDS}).+)?$"
)
POSTFIXED_UNIT: Final = rf"(?i)\s((?:{UNIT_WORDS}).+)$"


@functools.cache
def builtin(pattern: str) -> Regex:
    """One of the patterns above, compiled once per process."""
    return Regex.compile(pattern)


@functools.cache
def number_prefix() -> Regex:
    """NUMBER_PREFIX with its narrow gate."""
    return dataclasses.replace(builtin(NUMBER_PREFIX), narrow_gate=NUMBER_PREFIX_GATE)


def number_and_street(values: pa.Array) -> list[pa.Array]:
    """[prefixed_number, postfixed_street] of each value, as NUMBER_AND_STREET's groups.

    Capturing groups send RE2 down its slow submatch path (~0.5 µs a row), so only the
    number prefix is matched, by a replace that needs no captures: what is left is the
    street, and the bytes removed are the prefix, whose trimmed text is the number. The
    prefixes are cut out of the values' own data buffer, no byte copied: offsets alternating
    row start / street start make a 2n-row array whose even rows are the prefixes.
    """
    values = as_text(values)
    rest = number_prefix().substitute(values, Template(()))
    offsets, data = utf8_bytes(values)
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
    number = pc.utf8_trim(prefixes, PYTHON_SPACES)
    if (data[int(offsets[0]) : int(offsets[-1])] == 0x0A).any():
        rest = pc.replace_substring_regex(rest, r"(?s)\n.*", "")  # '.' stops at a newline
    return [number, rest]
