"""OpenAddresses source files: parse, upgrade v1 to v2, validate, and address layer entries.

A source file is community-written JSON. The current shape (schema v2) is::

    {"schema": 2, "coverage": {...}, "layers": {"addresses": [{"name": "county", ...}], ...}}

Each item of a layer list is an *entry*: it holds everything one run needs (``data``,
``protocol``, ``conform``, ``license``, ``skip``, ``timeout``...). A run is one
(source, layer, entry name); :func:`list_entries` is how the webhook fans a source out into
runs and :func:`get_entry` is how the worker finds the one it was given.

An entry's name is its ``name`` (``default`` when it has none). Upstream's schema lets two
entries of one layer share a name (``us/oh/city_of_perrysburg`` has two ``addresses`` entries
called ``city``, with different data); such entries are told apart by their position: each of
them is called ``<name>[<index>]``, ``index`` being its place in the layer's list as in the
JSON paths of messages (``city[0]`` and ``city[1]``, at ``layers.addresses[0]`` and ``[1]``).
A name used once stays as it is. The name is what runs are stored and shown under.

Every failure is a :class:`shared.errors.SourceError` with problem ``invalid_source`` and a
message that says where (file, line/column or JSON path), because that message ends up in
front of the contributor who wrote the file.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import heapq
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import PurePosixPath
from typing import Any, get_args

from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError, relevance
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from shared.errors import SourceError
from shared.messages import SourceProblem

__all__ = [
    "LAYERS",
    "SOURCE_PROBLEMS",
    "EntryRef",
    "SchemaProblem",
    "attribution",
    "entry_timeout_s",
    "get_entry",
    "is_skipped",
    "list_entries",
    "load_source",
    "parse_source",
    "schema_problems",
    "source_name",
    "upgrade_source",
    "validate_source",
]

#: Every code a run may fail with; see :data:`shared.messages.SourceProblem`.
SOURCE_PROBLEMS: frozenset[str] = frozenset(get_args(SourceProblem))

#: The layers a v2 source may have, in the order the project lists them.
LAYERS: tuple[str, ...] = ("addresses", "parcels", "buildings", "centerlines")

#: Entry name given to the single entry of an upgraded v1 source, and to entries without one.
DEFAULT_ENTRY_NAME = "default"

# The bundled schema's files carry no absolute `$id`, only relative `$ref`s
# (`./util/coverage.json`). Registering each file under one made-up base lets those refs resolve
# from the package; the host is reserved (.invalid) so nothing could ever fetch it.
_SCHEMA_BASE_URI = "https://schema.openaddresses.invalid/"
_ROOT_SCHEMA = "source_schema_v2.json"

# Top-level keys that stay on a v2 source when a v1 source is upgraded. v1 only had
# `coverage`; the others are v2-only but harmless to keep if a half-migrated file has them.
_V2_SOURCE_KEYS = frozenset({"coverage", "runner", "official_website", "official_phone"})

# A JSON-Schema error message repeats the offending value, which for a `oneOf` over a conform
# function can be the whole object; keep messages readable in a GitHub status.
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class EntryRef:
    """One layer entry of a source: what a run processes.

    ``index`` is the entry's position in its layer list, kept so that messages can point at
    ``layers.<layer>[<index>]`` in the file.
    """

    layer: str
    name: str
    index: int


@dataclass(frozen=True)
class SchemaProblem:
    """One place where a source breaks the schema.

    ``where`` is the JSON path (``layers.addresses[0].conform.format``), ``""`` for the
    document as a whole; ``problem`` is the source problem a run of it would fail with.
    """

    where: str
    message: str
    problem: SourceProblem

    def __str__(self) -> str:
        return f"{self.where or '(top level)'}: {self.message}"


#: Where source files live in the sources repository: ``sources/**/*.json``.
SOURCE_PATTERN = "sources/*.json"


def is_source_path(path: str) -> bool:
    """``sources/**/*.json`` (fnmatch's ``*`` crosses folders, which is what we want)."""
    return fnmatch.fnmatchcase(path, SOURCE_PATTERN)


def parse_source(data: bytes | str, *, path: str = "<source>") -> dict[str, Any]:
    """Parse a source file's text into a dict.

    Raises :class:`SourceError` if the text is not UTF-8, not JSON (the message gives line and
    column), nested too deeply for the parser, or not a JSON object.
    """
    if isinstance(data, bytes):
        try:
            # utf-8-sig: editors on Windows sometimes save a BOM, which json.loads rejects.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})", "invalid_source"
            ) from exc
    else:
        text = data
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            "invalid_source",
        ) from exc
    except ValueError as exc:  # from _reject_constant
        raise SourceError(f"{path}: invalid JSON: {exc}", "invalid_source") from exc
    except RecursionError as exc:
        raise _too_deep(path) from exc
    if not isinstance(parsed, dict):
        raise SourceError(
            f"{path}: a source must be a JSON object, not {_json_type(parsed)}", "invalid_source"
        )
    return parsed


def _too_deep(path: str) -> SourceError:
    # Python's json (and copy, and jsonschema) recurse once per level, so a file nested
    # thousands deep would otherwise end the caller with a RecursionError.
    return SourceError(
        f"{path}: invalid JSON: arrays or objects are nested too deeply to read",
        "invalid_source",
    )


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which no other tool
    # reading the sources repository would accept.
    raise ValueError(f"{name} is not valid JSON")


def upgrade_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``source`` in schema v2 shape; the input is never modified.

    A v2 source (``"layers"`` present, or ``"schema": 2``) comes back as a deep copy. A legacy
    layerless v1 source becomes a v2 source with one ``addresses`` entry named ``default``:

    * ``coverage`` stays at the top level, ``"schema": 2`` is set;
    * every other v1 key (``data``, ``protocol``, ``compression``, ``conform``, ``license``,
      ``attribution``, ``website``, ``email``, ``contact``, ``note``, ``language``, ``year``,
      ``skip``, ``test``) moves into the entry, since v2 keeps them per entry;
    * the old spellings ``type`` (for ``protocol``) and ``conform.type`` (for
      ``conform.format``) are renamed when the new spelling is absent.

    Unknown keys also move into the entry rather than being dropped, so that
    :func:`validate_source` reports them instead of the data silently disappearing.
    """
    if not _is_v1(source):
        return copy.deepcopy(dict(source))

    upgraded: dict[str, Any] = {}
    entry: dict[str, Any] = {"name": DEFAULT_ENTRY_NAME}
    for key, value in source.items():
        if key == "schema":
            continue  # a v1 file may say "schema": 1; the result is 2 whatever it said
        if key in _V2_SOURCE_KEYS:
            upgraded[key] = copy.deepcopy(value)
        elif key == "type" and "protocol" not in source:
            entry["protocol"] = value
        elif key == "conform" and isinstance(value, Mapping):
            entry["conform"] = _upgrade_conform(value)
        else:
            entry[key] = copy.deepcopy(value)
    upgraded["schema"] = 2
    upgraded["layers"] = {"addresses": [entry]}
    return upgraded


def _is_v1(source: Mapping[str, Any]) -> bool:
    return "layers" not in source and source.get("schema") != 2


def _upgrade_conform(conform: Mapping[str, Any]) -> dict[str, Any]:
    upgraded: dict[str, Any] = {}
    for key, value in conform.items():
        if key == "type" and "format" not in conform:
            upgraded["format"] = value
        else:
            upgraded[key] = copy.deepcopy(value)
    return upgraded


def validate_source(source: Mapping[str, Any], *, path: str = "<source>") -> None:
    """Check a v2 source against the bundled OpenAddresses JSON Schema (draft-07).

    Raises :class:`SourceError` naming the JSON path of the most relevant error, e.g.
    ``us/ks/lane.json: layers.addresses[0].conform.format: 'csvx' is not one of [...]``.
    Formats (``uri``, ``email``) are not checked, as upstream's own validation does not
    reject sources for them.
    """
    try:
        errors = _schema_errors(source)
        error = _most_relevant(errors)
        # The message shows the offending value, which is as deep as the document.
        message = f"{path}: {_describe(error)}" if error is not None else None
    except RecursionError as exc:
        raise _too_deep(path) from exc
    if error is not None and message is not None:
        raise SourceError(message, _problem_of(error))
    version = _version_problem(source)
    if version is not None:
        raise SourceError(f"{path}: {version}", version.problem)


def schema_problems(source: Mapping[str, Any]) -> list[SchemaProblem]:
    """Every part of a v2 source that breaks the schema, the most relevant error of each.

    A part is one layer entry, or one other top-level key, so a file with two broken entries
    gives two problems, while the dozens of errors a ``oneOf`` over conform functions yields
    for one bad spec give one. Empty when the source is valid. Raises :class:`SourceError`
    for a document too deeply nested to check.
    """
    try:
        errors = _schema_errors(source)
        groups: dict[tuple[Any, ...], list[ValidationError]] = {}
        for error in errors:
            parts = tuple(error.absolute_path)
            groups.setdefault(parts[:3] if parts[:1] == ("layers",) else parts[:1], []).append(
                error
            )
        problems = []
        for group in groups.values():
            best = _most_relevant(group)
            if best is not None:
                problems.append(_schema_problem(best))
    except RecursionError as exc:
        raise _too_deep("<source>") from exc
    version = _version_problem(source)
    if version is not None and not problems:
        problems.append(version)
    return problems


def _schema_errors(source: Mapping[str, Any]) -> list[ValidationError]:
    return list(_validator().iter_errors(source))


def _version_problem(source: Mapping[str, Any]) -> SchemaProblem | None:
    # The schema only says `schema` is a number; everything downstream assumes v2.
    if source.get("schema") == 2:
        return None
    return SchemaProblem(
        "schema", f"{source.get('schema')!r} is not a supported schema version (2)",
        "invalid_source",
    )


def _schema_problem(error: ValidationError) -> SchemaProblem:
    where, message = _json_path(error.absolute_path), _message(error)
    return SchemaProblem(where, message, _problem_of(error))


def _most_relevant(errors: list[ValidationError]) -> ValidationError | None:
    """jsonschema's ``best_match``, except at a ``oneOf`` over conform functions.

    Each function schema pins ``"function"`` to its name, so a value naming a known function
    with a wrong argument also fails every other branch, one of whose errors ``best_match``
    took: ``{"function": "regexp", "field": "a"}`` was told "'prefixed_number' was expected".
    Here only the branch of the function named is looked into; a name no branch has stays
    the ``oneOf`` error, which :func:`_message` words as an unknown function.
    """
    best = max(errors, key=relevance, default=None)
    while best is not None and best.context:
        branch = _function_branch(best)
        if branch == []:
            break
        smallest = heapq.nsmallest(2, branch or best.context, key=relevance)
        if branch is None and len(smallest) == 2 and relevance(smallest[0]) == relevance(
            smallest[1]
        ):
            break
        best = smallest[0]
    return best


def _function_branch(error: ValidationError) -> list[ValidationError] | None:
    """At a ``oneOf``/``anyOf`` of function schemas over a value naming a function: the errors
    of that function's branch (``[]`` if no branch has the name); None anywhere else."""
    name = error.instance.get("function") if isinstance(error.instance, Mapping) else None
    branches = error.schema.get(str(error.validator)) if isinstance(error.schema, Mapping) else None
    if error.validator not in ("oneOf", "anyOf") or not isinstance(name, str):
        return None
    if not isinstance(branches, list):
        return None
    names = [_function_names(branch) for branch in branches]
    if not any(names):
        return None
    matching = {index for index, branch_names in enumerate(names) if name in branch_names}
    return [
        e for e in error.context or ()
        if e.relative_schema_path and e.relative_schema_path[0] in matching
    ]


def _function_names(schema: Any, depth: int = 0) -> frozenset[str]:
    """The functions a schema accepts: its own pinned name, or those of its ``oneOf``/``anyOf``
    branches (address_conform.json nests standard_functions.json's ``oneOf`` in another)."""
    if not isinstance(schema, Mapping) or depth > 3:
        return frozenset()
    function = schema.get("properties", {}).get("function")
    name = function.get("const") if isinstance(function, Mapping) else None
    if isinstance(name, str):
        return frozenset({name})
    names: frozenset[str] = frozenset()
    for keyword in ("oneOf", "anyOf"):
        for branch in schema.get(keyword) or ():
            names |= _function_names(branch, depth + 1)
    return names


def _problem_of(error: ValidationError) -> SourceProblem:
    """The source problem a schema error stands for, from where in the document it is.

    A format or protocol outside the schema's list is the more specific problem the people
    fixing the source need; anything else is an invalid source.
    """
    parts = list(error.absolute_path)
    if error.validator == "enum" and parts[-2:] == ["conform", "format"]:
        return "unknown_format"
    if error.validator == "enum" and parts[-1:] == ["protocol"]:
        return "unknown_protocol"
    return "invalid_source"


def _describe(error: ValidationError) -> str:
    return str(_schema_problem(error))


def _message(error: ValidationError) -> str:
    message = error.message
    if _function_branch(error) == [] and isinstance(error.instance, Mapping):
        known = ", ".join(sorted(_function_names(error.schema)))
        message = f"unknown function {error.instance.get('function')!r}; known here: {known}"
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
    return message


def _json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def prepare_validator() -> None:
    """Build the source schema's validator now rather than on the first validation."""
    _validator()


@functools.cache
def _validator() -> Draft7Validator:
    # Compiled once per process: building the registry reads ~40 files.
    root = files("shared") / "schema"
    registry: Registry[Any] = Registry()
    for relpath, node in _schema_files(root, ""):
        contents = json.loads(node.read_text(encoding="utf-8"))
        resource = Resource.from_contents(contents, default_specification=DRAFT7)
        registry = registry.with_resource(_SCHEMA_BASE_URI + relpath, resource)
    # crawl() also indexes resources by their own `$id` (util/geojson.json says "geojson"),
    # which its internal `#/definitions/...` refs resolve against.
    registry = registry.crawl()
    Draft7Validator.check_schema(registry.contents(_SCHEMA_BASE_URI + _ROOT_SCHEMA))
    # Resolving a `$ref` (a URL join and a registry lookup) was 40 % of validating, and every
    # conform value is checked against a `oneOf` of a dozen referenced function schemas: the
    # schema is validated with each `$ref` replaced by its target instead, three times faster
    # (18 s to 6 s for the 2,833 real sources). Draft 7 ignores a `$ref`'s siblings, as this
    # does; the recursive refs of util/geojson.json become cycles between dicts, which the
    # validator only follows as deep as the document goes.
    entry = registry.resolver().lookup(_SCHEMA_BASE_URI + _ROOT_SCHEMA)
    return Draft7Validator(_inline_refs(entry.contents, entry.resolver, {}))


#: Keywords whose values are data, not schemas: a `$ref` key in them is not a reference.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "required"})
#: Keywords whose values map names to schemas (a property may be called `$ref`).
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "definitions", "dependencies"})


def _inline_refs(node: Any, resolver: Any, done: dict[int, Any]) -> Any:
    """``node`` with every ``$ref`` replaced by the (itself inlined) schema it points at.

    ``resolver`` is the ``referencing`` resolver at ``node``'s place (its class is not public).
    """
    if isinstance(node, list):
        return [_inline_refs(item, resolver, done) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = resolver.lookup(node["$ref"])
        key = id(target.contents)
        if key not in done:
            # Registered before descending, so a schema reaching itself gets this very dict.
            inlined: dict[str, Any] | None = {} if isinstance(target.contents, dict) else None
            done[key] = inlined
            result = _inline_refs(target.contents, target.resolver, done)
            if inlined is None:
                done[key] = result
            else:
                inlined.update(result)
        return done[key]
    out: dict[str, Any] = {}
    for keyword, value in node.items():
        if keyword in _DATA_KEYWORDS:
            out[keyword] = value
        elif keyword in _SCHEMA_MAPS and isinstance(value, dict):
            out[keyword] = {name: _inline_refs(sub, resolver, done) for name, sub in value.items()}
        else:
            out[keyword] = _inline_refs(value, resolver, done)
    return out


def _schema_files(node: Traversable, prefix: str) -> Iterator[tuple[str, Traversable]]:
    for child in node.iterdir():
        relpath = prefix + child.name
        if child.is_dir():
            # retired/ is the draft-04 v1 schema, kept for reference; it refs the network.
            if child.name != "retired":
                yield from _schema_files(child, relpath + "/")
        elif child.name.endswith(".json"):
            yield relpath, child


def load_source(data: bytes | str, *, path: str = "<source>") -> dict[str, Any]:
    """Parse, upgrade to v2 and validate a source file: what callers normally want."""
    parsed = parse_source(data, path=path)
    try:
        # A file just shallow enough for the parser can still be too deep to copy.
        source = upgrade_source(parsed)
    except RecursionError as exc:
        raise _too_deep(path) from exc
    validate_source(source, path=path)
    return source


def list_entries(source: Mapping[str, Any]) -> list[EntryRef]:
    """Every layer entry of a v2 source, layers and entries in file order.

    ``name`` is the entry's name as runs know it (see the module docstring): its ``name``,
    ``default`` without one, ``<name>[<index>]`` when the layer has more than one entry of that
    name. An unknown layer, an entry that is not an object, or a made-up name that another
    entry of the layer is really called raise :class:`SourceError`, since runs are addressed
    by (layer, name) and must not be ambiguous.
    """
    layers = source.get("layers")
    if layers is None:
        return []
    if not isinstance(layers, Mapping):
        raise SourceError(f"layers: must be an object, not {_json_type(layers)}")
    refs: list[EntryRef] = []
    for layer, entries in layers.items():
        if layer not in LAYERS:
            raise SourceError(f"layers: unknown layer '{layer}' (expected one of {LAYERS})")
        if not isinstance(entries, list):
            raise SourceError(f"layers.{layer}: must be an array, not {_json_type(entries)}")
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise SourceError(
                    f"layers.{layer}[{index}]: an entry must be an object, not {_json_type(entry)}"
                )
        refs.extend(_layer_refs(layer, entries))
    return refs


def _layer_refs(layer: str, entries: list[Mapping[str, Any]]) -> list[EntryRef]:
    given = [_entry_name(entry) for entry in entries]
    uses = Counter(given)
    names = [
        name if uses[name] == 1 else f"{name}[{index}]" for index, name in enumerate(given)
    ]
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            # Only a made-up name can collide: entries "a", "a" and "a[1]".
            raise SourceError(
                f"layers.{layer}[{index}]: entry name '{name}' is also the name given to "
                f"layers.{layer}[{seen[name]}]"
            )
        seen[name] = index
    return [EntryRef(layer=layer, name=name, index=index) for index, name in enumerate(names)]


def _entry_name(entry: Mapping[str, Any]) -> str:
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        return name
    return DEFAULT_ENTRY_NAME


def get_entry(source: Mapping[str, Any], layer: str, name: str) -> dict[str, Any]:
    """A deep copy of the entry ``name`` of ``layer``, with its ``name`` filled in.

    Nothing is merged in from the source level: in schema v2 an entry is self-contained
    (``license``, ``website``, ``timeout``, ``skip``... are entry fields, and the source level
    only holds ``coverage``, ``runner`` and ``official_*``). Functions that need both, such as
    :func:`attribution`, take the source too.
    """
    for ref in list_entries(source):
        if ref.layer == layer and ref.name == name:
            entry = copy.deepcopy(dict(source["layers"][layer][ref.index]))
            entry["name"] = ref.name
            return entry
    raise SourceError(f"source has no entry '{name}' in layer '{layer}'", "invalid_source")


def entry_timeout_s(entry: Mapping[str, Any], default_s: float) -> float:
    """The wall-clock limit of a run of ``entry``, in seconds.

    ``timeout`` is an entry field counted in whole hours (``util/timeout.json``); without it
    the caller's default applies (the schema's own default is 6 hours).
    """
    hours = entry.get("timeout")
    if hours is None:
        return float(default_s)
    # bool is an int in Python but not an integer in JSON Schema.
    if isinstance(hours, bool) or not isinstance(hours, int | float) or hours <= 0:
        raise SourceError(f"timeout: {hours!r} is not a positive number of hours")
    return float(hours) * 3600.0


def is_skipped(entry: Mapping[str, Any]) -> bool:
    """Whether the entry says ``"skip": true`` (its runs end as skipped, not failed)."""
    return entry.get("skip") is True


def attribution(source: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Licence and attribution of an entry, normalised for ``index.json``.

    Returns ``license_text``, ``license_url``, ``attribution_required``, ``attribution_name``,
    ``share_alike`` and ``website``; a value the file does not give is ``None`` (unknown), never
    a guess of ``False``. ``license`` may be a string (a URL or a licence name) or an object
    (``util/license.json``). ``attribution_required`` is taken as true when the file names
    someone to credit without saying, since naming them only makes sense if credit is due.
    ``website`` falls back to the source's ``official_website``.
    """
    license_value = entry.get("license")
    license_obj: Mapping[str, Any]
    if isinstance(license_value, str):
        text = license_value.strip()
        is_url = text.startswith(("http://", "https://"))
        license_obj = {"url": text} if is_url else {"text": text}
    elif isinstance(license_value, Mapping):
        license_obj = license_value
    else:
        license_obj = {}

    name = _text(license_obj.get("attribution name")) or _text(entry.get("attribution"))
    required = license_obj.get("attribution")
    if not isinstance(required, bool):
        required = True if name else None
    share_alike = license_obj.get("share-alike")
    return {
        "license_text": _text(license_obj.get("text")),
        "license_url": _text(license_obj.get("url")),
        "attribution_required": required,
        "attribution_name": name,
        "share_alike": share_alike if isinstance(share_alike, bool) else None,
        "website": _text(entry.get("website")) or _text(source.get("official_website")),
    }


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def source_name(path: str) -> str:
    """The source's name from its repository path: ``sources/us/ks/lane_county.json`` →
    ``us/ks/lane_county``. A path without the ``sources/`` folder is taken as already
    relative to it."""
    parts = PurePosixPath(path.replace("\\", "/").lstrip("/")).parts
    if parts and parts[0] == "sources":
        parts = parts[1:]
    if not parts:
        raise SourceError(f"{path!r} is not a source path")
    name = "/".join(parts)
    return name.removesuffix(".json")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
