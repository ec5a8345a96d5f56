"""Every conform function, vectorised over Arrow string arrays.

A conform maps each output attribute to a *value spec*: a field name, a list of field names
(joined by a space), or a function object (``{"function": "regexp", ...}``). ``Evaluator``
compiles the specs once per run (names resolved, regular expressions compiled, arguments
checked) and then evaluates whole record batches with ``pyarrow.compute`` kernels.

Semantics follow the reference Machine (``openaddr/conform.py``): a missing value reads as the
empty string, an attribute that comes out empty is null. Where the reference is silent or
crashes, the choice made here is written next to the code. What a name in a spec reads (a
source field, an earlier attribute, a chain variable) is decided in ``scope.py``; regular
expressions and the built-in address patterns are in ``regexes.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.worker.conform.arrays import (
    affix_matches,
    as_text,
    cut_bytes,
    filled_everywhere,
    utf8_bytes,
)
from services.worker.conform.fields import FieldResolver
from services.worker.conform.layers import LAYER_ATTRIBUTES
from services.worker.conform.regexes import (
    NUMBER_AND_STREET,
    POSTFIXED_STREET_UNITS,
    POSTFIXED_UNIT,
    PatternError,
    Regex,
    builtin,
    number_and_street,
    parse_template,
)
from services.worker.conform.scope import Compiler, Env, Scope, Step, Where, variable_key

_NULL: Final = pa.scalar(None, pa.string())

#: Conform keys that hold value specs; everything else in a conform is reader metadata.
ATTRIBUTE_KEYS: Final[frozenset[str]] = frozenset(
    {name for names in LAYER_ATTRIBUTES.values() for name in names} | {"lon", "lat"}
)

_MPH_TO_KPH: Final = 1.609344


def _blank_to_null(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ""), _NULL, values)


def _drop_point_zero(values: pa.Array) -> pa.Array:
    """'12.0' -> '12': numbers that went through a float column somewhere upstream."""
    return pc.if_else(pc.ends_with(values, ".0"), pc.utf8_slice_codeunits(values, 0, -2), values)


# --- compilation ---------------------------------------------------------------------------


def _required(
    spec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: Where
) -> Any:
    if key not in spec:
        raise where.fail(f"function {spec['function']!r} needs {key!r}")
    value = spec[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise where.fail(
            f"{key!r} of function {spec['function']!r} has the wrong type: {value!r}"
        )
    return value


def _field_list(spec: Mapping[str, Any], scope: Scope, where: Where) -> list[Step]:
    names = _required(spec, "fields", list, where)
    if not names:
        raise where.fail(f"function {spec['function']!r} needs at least one field")
    return [scope.reader(n, where) for n in names]


def _joined(readers: Sequence[Step], separator: str) -> Step:
    """Trimmed non-empty values joined by ``separator`` (the reference join function)."""

    def step(env: Env) -> pa.Array:
        parts = [pc.utf8_trim_whitespace(as_text(read(env))) for read in readers]
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


def _compile_join(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    separator = spec.get("separator", " ")
    if not isinstance(separator, str):
        raise where.fail(f"'separator' of function 'join' must be a string: {separator!r}")
    return _joined(_field_list(spec, scope, where), separator)


def _compile_regexp(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)
    try:
        regex = Regex.compile(_required(spec, "pattern", str, where))
    except PatternError as exc:
        raise where.fail(str(exc)) from None
    replace = spec.get("replace")
    if replace is None or replace == "":
        # The reference tested ``if replace:``, so an empty replace means "extract".
        return lambda env: regex.search(read(env))
    if not isinstance(replace, str):
        raise where.fail(f"'replace' of function 'regexp' must be a string: {replace!r}")
    try:
        template = parse_template(replace, regex.python)
    except PatternError as exc:
        raise where.fail(str(exc)) from None
    return lambda env: regex.substitute(read(env), template)


def _compile_builtin(pattern: str, group: int) -> Compiler:
    """A function reading one group of a built-in pattern.

    prefixed_number and postfixed_street are groups of one pattern; when both read the same
    column, the regex runs once per batch (Env.cache) instead of twice.
    """

    def compile_(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
        name = _required(spec, "field", str, where)
        read = scope.reader(name, where)
        column = scope.column_of(name)
        regex = builtin(pattern)

        def step(env: Env) -> pa.Array:
            if column is None:  # a variable changes between steps: nothing to share
                return regex.groups(read(env))[group]
            key = (pattern, column)
            if key not in env.cache:
                env.cache[key] = regex.groups(read(env))
            return env.cache[key][group]

        return step

    return compile_


def _compile_number_and_street(group: int) -> Compiler:
    """prefixed_number (0) or postfixed_street (1): one pass per batch serves both."""

    def compile_(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
        name = _required(spec, "field", str, where)
        read = scope.reader(name, where)
        column = scope.column_of(name)

        def step(env: Env) -> pa.Array:
            if column is None:  # a variable changes between steps: nothing to share
                return number_and_street(read(env))[group]
            key = (NUMBER_AND_STREET, column)
            if key not in env.cache:
                env.cache[key] = number_and_street(read(env))
            return env.cache[key][group]

        return step

    return compile_


def _compile_postfixed_street(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    units = spec.get("may_contain_units", False)
    if not isinstance(units, bool):
        raise where.fail(f"'may_contain_units' must be true or false: {units!r}")
    if units:
        return _compile_builtin(POSTFIXED_STREET_UNITS, 0)(spec, scope, where)
    return _compile_number_and_street(1)(spec, scope, where)


@dataclass(frozen=True)
class _Placeholder:
    literal: str  #: format text since the previous placeholder
    index: int | None  #: 0-based field index; None when ``$n`` names no field


def _compile_format(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
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

    def step(env: Env) -> pa.Array:
        # Reference rules: the text before the first placeholder and after the last one is
        # written whenever any field has a value; the text before any other placeholder only
        # when that field has a value and an earlier one did too. Each value is trimmed and
        # loses a trailing ".0".
        values = [_drop_point_zero(pc.utf8_trim_whitespace(as_text(r(env)))) for r in readers]
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


def _compile_remove_affix(at_end: bool) -> Compiler:
    def compile_(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
        read = scope.reader(_required(spec, "field", str, where), where)
        read_affix = scope.reader(_required(spec, "field_to_remove", str, where), where)

        def step(env: Env) -> pa.Array:
            values, affixes = as_text(read(env)), as_text(read_affix(env))
            matched = affix_matches(values, affixes, at_end)
            lengths = np.diff(utf8_bytes(affixes)[0])
            none = np.zeros(len(values), dtype=np.int64)
            if at_end:
                # The reference ignores an empty postfix (but strips an empty prefix).
                matched &= lengths > 0
                cut = pc.utf8_rtrim(cut_bytes(values, none, np.where(matched, lengths, 0)), " ")
            else:
                cut = pc.utf8_ltrim(cut_bytes(values, np.where(matched, lengths, 0), none), " ")
            return pc.if_else(pa.array(matched), cut, values)

        return step

    return compile_


def _compile_first_non_empty(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    readers = _field_list(spec, scope, where)

    def step(env: Env) -> pa.Array:
        candidates = []
        for read in readers:
            values = read(env)
            blank = pc.equal(pc.utf8_trim_whitespace(values), "")
            candidates.append(pc.if_else(blank, _NULL, values))
        return pc.fill_null(pc.coalesce(*candidates), "")

    return step


def _constantas_text(value: Any, where: Where) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise where.fail(f"a constant must be a string or a number, not {value!r}")
    return value if isinstance(value, str) else str(value)


def _constant(text: str) -> Step:
    return lambda env: pa.repeat(pa.scalar(text, pa.string()), env.length)


def _compile_constant(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    if "value" not in spec:
        raise where.fail("function 'constant' needs 'value'")
    return _constant(_constantas_text(spec["value"], where))


def _compile_map(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)
    mapping = _required(spec, "mapping", dict, where)
    keys = pa.array([str(k) for k in mapping], pa.string())
    targets = pa.array([_constantas_text(v, where) for v in mapping.values()], pa.string())
    otherwise = _constantas_text(spec["else"], where) if "else" in spec else None

    def step(env: Env) -> pa.Array:
        # Values are trimmed before the lookup; an unmapped value becomes ``else`` when given
        # and is kept as it is otherwise.
        values = pc.utf8_trim_whitespace(as_text(read(env)))
        mapped = pc.take(targets, pc.index_in(values, value_set=keys))
        return pc.coalesce(mapped, values if otherwise is None else otherwise)

    return step


# A list-valued field reaches the conform as text: Python's repr of a list, as the reference
# wrote GDAL's string lists into its CSV (['Polska', 'kujawsko-pomorskie']), JSON from our OGR
# reader (["a", "b"]), or whatever a provider typed. An item is quoted with ' or " (a quoted
# item may hold commas) or bare, items are separated by commas with optional spaces, and the
# brackets are optional. The reference removed every bracket and quote and split on commas;
# reading quoted items whole keeps "O'Brien" and "Smith, John" intact, and gives the same
# result for every list without such items.
_LIST_ITEM: Final = r"""(?:'[^']*'|"(?:[^"\\]|\\.)*"|[^,\]]*)"""
#: RE2's limit on a counted repetition; an index past it is read the per-value way.
_MAX_GET_INDEX: Final = 1000


def _item_pattern(index: int) -> str:
    """An RE2 pattern whose group ``item`` is item ``index`` (0-based) of a list."""
    skipped = rf"(?:{_LIST_ITEM}\s*,\s*){{{index}}}" if index else ""
    return rf"^\s*\[?\s*{skipped}(?P<item>{_LIST_ITEM})"


_LIST_ITEMS: Final = re.compile(rf"(?:^\s*\[?|,)\s*({_LIST_ITEM})")


def _list_item(text: str, index: int) -> str:
    """Item ``index`` of a list (negative: from the end), ``''`` past its end; per value."""
    items = [match.group(1) for match in _LIST_ITEMS.finditer(text)]
    return items[index] if -len(items) <= index < len(items) else ""


def _unquoted(items: pa.Array) -> pa.Array:
    """Items trimmed and stripped of their quotes; JSON escapes in double quotes decoded,
    a bare ``null`` empty."""
    items = pc.utf8_trim_whitespace(items)
    long_enough = pc.greater_equal(pc.utf8_length(items), 2)
    quoted = pc.and_(
        long_enough,
        pc.or_(
            pc.and_(pc.starts_with(items, "'"), pc.ends_with(items, "'")),
            pc.and_(pc.starts_with(items, '"'), pc.ends_with(items, '"')),
        ),
    )
    inner = pc.if_else(quoted, pc.utf8_slice_codeunits(items, 1, -1), items)
    # A JSON list (our OGR reader's) says null for a missing item.
    inner = pc.if_else(pc.equal(items, "null"), "", inner)
    escaped = pc.and_(pc.starts_with(items, '"'), pc.match_substring(inner, "\\"))
    if not pc.any(escaped).as_py():
        return inner
    rows = np.flatnonzero(escaped.to_numpy(zero_copy_only=False))
    decoded = [_json_string(items[int(row)].as_py()) for row in rows]
    return pc.replace_with_mask(inner, escaped, pa.array(decoded, pa.string()))


def _json_string(quoted: str) -> str:
    try:
        value = json.loads(quoted)
    except ValueError:
        return quoted[1:-1]
    return value if isinstance(value, str) else quoted[1:-1]


def _compile_get(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)
    index = _required(spec, "index", int, where)
    pattern = _item_pattern(index) if 0 <= index < _MAX_GET_INDEX else None

    def step(env: Env) -> pa.Array:
        # A value that is no list is a list of one item; an index past the end gives ''.
        values = as_text(read(env))
        if pattern is None:  # from the end, as Python indexes, or absurdly far
            items = pa.array([_list_item(t, index) for t in values.to_pylist()], pa.string())
        else:
            items = pc.fill_null(pc.extract_regex(values, pattern).field("item"), "")
        return _unquoted(items)

    return step


_DECIMAL: Final = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$"


def _compile_mph_to_kph(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    read = scope.reader(_required(spec, "field", str, where), where)

    def step(env: Env) -> pa.Array:
        # Rounded to whole km/h, as speed limits are posted; non-numbers become empty.
        values = pc.utf8_trim_whitespace(as_text(read(env)))
        numeric = pc.if_else(pc.match_substring_regex(values, _DECIMAL), values, _NULL)
        kph = pc.round(pc.multiply(numeric.cast(pa.float64()), _MPH_TO_KPH), round_mode="half_up")
        return pc.fill_null(kph.cast(pa.int64()).cast(pa.string()), "")

    return step


def _compile_chain(spec: Mapping[str, Any], scope: Scope, where: Where) -> Step:
    variable = _required(spec, "variable", str, where)
    functions = _required(spec, "functions", list, where)
    if not functions:
        raise where.fail("function 'chain' needs at least one function")
    key = variable_key(variable)
    scope.declare(variable)
    steps = []
    for number, function in enumerate(functions, 1):
        steps.append(_compile_spec(function, scope, where.step(number)))
        scope.written(variable)

    def step(env: Env) -> pa.Array:
        # Each step's result is the variable for the steps after it; the last is the value.
        # Until the first step writes it, the variable holds what an earlier chain of the same
        # name left there (the reference kept one row of fields), else ''.
        result = env.variable(key)
        for each in steps:
            result = as_text(each(env))
            env.variables[key] = result
        return result

    return step


_FUNCTIONS: Final[dict[str, Compiler]] = {
    "join": _compile_join,
    "regexp": _compile_regexp,
    "format": _compile_format,
    "prefixed_number": _compile_number_and_street(0),
    "postfixed_street": _compile_postfixed_street,
    "postfixed_unit": _compile_builtin(POSTFIXED_UNIT, 0),
    "remove_prefix": _compile_remove_affix(at_end=False),
    "remove_postfix": _compile_remove_affix(at_end=True),
    "first_non_empty": _compile_first_non_empty,
    "chain": _compile_chain,
    "constant": _compile_constant,
    "map": _compile_map,
    "get": _compile_get,
    "mph_to_kph": _compile_mph_to_kph,
}


def _compile_spec(spec: Any, scope: Scope, where: Where) -> Step:
    if spec is None:
        return lambda env: pa.repeat(pa.scalar("", pa.string()), env.length)
    if isinstance(spec, str):
        return scope.reader(spec, where)
    if isinstance(spec, list):
        if not spec:
            raise where.fail("an empty list of fields")
        return _joined([scope.reader(name, where) for name in spec], " ")
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return _constant(str(spec))  # "accuracy": 3
    if isinstance(spec, Mapping):
        name = spec.get("function")
        compiler = _FUNCTIONS.get(name) if isinstance(name, str) else None
        if compiler is None:
            known = ", ".join(sorted(_FUNCTIONS))
            raise where.fail(f"unknown function {name!r}; known functions: {known}")
        return compiler(spec, scope, where)
    raise where.fail(f"cannot read value spec {spec!r}")


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


@dataclass
class _Names:
    """What the specs of a conform read, collected in conform order."""

    fields: set[str] = field(default_factory=set)
    #: ``oa:`` keys of attributes and chain variables, wherever they are in the conform.
    oa_keys: set[str] = field(default_factory=set)
    #: Chain variables (casefolded) written so far: their plain name reads the variable.
    written: set[str] = field(default_factory=set)

    def read(self, name: str) -> None:
        if name.casefold() not in self.written:
            self.fields.add(name)

    def collect(self, spec: Any) -> None:
        if isinstance(spec, str):
            self.read(spec)
        elif isinstance(spec, list):
            for item in spec:
                self.collect(item)
        elif isinstance(spec, Mapping):
            for key in ("field", "field_to_remove"):
                if isinstance(spec.get(key), str):
                    self.read(spec[key])
            for name in spec.get("fields") or ():
                if isinstance(name, str):
                    self.read(name)
            variable = spec.get("variable")
            if spec.get("function") == "chain" and isinstance(variable, str):
                self.oa_keys.add(variable_key(variable))
                for step in spec.get("functions") or ():
                    self.collect(step)
                    self.written.add(variable.casefold())


def referenced_fields(conform: Mapping[str, Any]) -> set[str]:
    """Every source field name any attribute/lon/lat spec reads, as the conform spells it.

    Names that read variables are left out: ``oa:<attribute>``, ``oa:<variable>`` and a chain
    variable's plain name once the chain has written it (``scope.py``). A plain name read
    before that may be a real column, so it is in.
    """
    names = _Names()
    for key, spec in attribute_specs(conform).items():
        if not _is_accuracy_code(key, spec):
            names.collect(spec)
        names.oa_keys.add(variable_key(key))
    return {n for n in names.fields if n.casefold() not in names.oa_keys}


class Evaluator:
    """Compiled value specs of one conform over one source schema.

    A spec that cannot be compiled raises :class:`~services.worker.errors.ConformError`
    naming its attribute.
    """

    def __init__(self, specs: Mapping[str, Any], field_names: Sequence[str]) -> None:
        scope = Scope(FieldResolver(field_names))
        self._steps: list[tuple[str, Step]] = []
        for attribute, spec in specs.items():
            if _is_accuracy_code(attribute, spec):
                spec = int(spec)
            self._steps.append((attribute, _compile_spec(spec, scope, Where(attribute))))
            # Later specs may read an earlier attribute's value as field "oa:<attribute>".
            scope.variables.add(variable_key(attribute))
        self._columns = frozenset(scope.columns_read)

    @property
    def attributes(self) -> list[str]:
        return [attribute for attribute, _ in self._steps]

    @property
    def columns(self) -> frozenset[str]:
        """The source columns the specs read (as the batch names them)."""
        return self._columns

    def evaluate(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """Attribute -> ``pa.string()`` array as long as the batch, null where empty."""
        env = Env(batch)
        out: dict[str, pa.Array] = {}
        for attribute, step in self._steps:
            values = as_text(step(env))
            env.variables[variable_key(attribute)] = values
            out[attribute] = _blank_to_null(values)
        return out
