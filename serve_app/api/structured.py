"""Structured output at the edge (no torch): what the request asks for, checked, as one schema text.

Accepted on both /v1/completions and /v1/chat/completions (as vLLM does):

* ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any
  JSON object), ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
  "strict": ...}`` (what the official client's ``response_format=`` / ``parse`` helpers send);
* vLLM's ``guided_json`` (a schema, as an object or as JSON text) and ``structured_outputs:
  {"json": <schema>}``.

All of them become ``SamplingParams.json_schema``: the schema as compact JSON text, key order
kept (it is the order the object's properties are generated in), the engine's compile-cache key.
A schema that is not a valid JSON Schema (``jsonschema``'s meta-schema check) is refused here,
as a 400 naming the field; one the grammar library cannot compile is refused by the engine at
submit, also a 400 (engine/structured.py). Never a 500.

Complexity bounds, because a schema's compile time is not bounded by its size: xgrammar expands
bounded repetition in a regex (``pattern``, ``patternProperties`` keys, ``propertyNames``) into
states, so nested bounds multiply (at vocab 16k the 46-character
``^(([a-z0-9]{1,16}-){1,16}[a-z]{1,16}\\.){1,16}$``, 4,590 states, took 4.5 s to compile, and
``^([a-z]{1,16}-){1,16}$``, 255 states, 0.9 s; a reported 49-character one: 19 s). Refused
here, each a 400 naming the value and the limit: a repetition bound over ``MAX_REGEX_REPEAT``,
quantifiers nested deeper than ``MAX_REGEX_NESTED_QUANTIFIERS``, nested repetitions whose
expansion (summed over the schema's regexes) is over ``MAX_REGEX_NESTED_EXPANSION``, groups
nested deeper than ``MAX_REGEX_GROUP_DEPTH``, a schema nested deeper than ``MAX_SCHEMA_DEPTH``
(which also keeps ``json`` and ``jsonschema`` from recursing out: that was a 500). Flat
repetition (``[a-z]{1,1000}``), ``maxLength`` / ``maxItems`` and number ranges compile in
milliseconds and are not counted. These are the cheap first filter; the engine's compile time
and memory limits (``structured_output_compile_timeout_s`` / ``_memory_bytes``) bound whatever
passes them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import PydanticCustomError

MAX_SCHEMA_CHARS = 32 * 1024  # compiling is per distinct schema; keep one request's bounded
MAX_SCHEMA_DEPTH = 64  # nested JSON objects / arrays in the schema document (~2 per schema level; OpenAI allows 10 levels)
MAX_REGEX_REPEAT = 1000  # largest {m,n} bound in a pattern (long strings: maxLength)
MAX_REGEX_NESTED_QUANTIFIERS = 3  # a repetition in a repetition in a repetition ("?" not counted)
MAX_REGEX_NESTED_EXPANSION = 256  # states nested bounded repetitions expand to, over all the schema's regexes
MAX_REGEX_GROUP_DEPTH = 32  # nested groups in a pattern
# Keywords whose values are data, not schemas: a "pattern" key inside them is not a regex.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "description", "title", "$comment",
                            "required", "dependentRequired", "type", "format"})
# Keywords whose value maps names to schemas: its keys are names, not keywords.
_NAME_MAPS = frozenset({"properties", "$defs", "definitions", "dependentSchemas", "dependencies"})
JSON_OBJECT_SCHEMA = '{"type":"object"}'


def _error(message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError("invalid_schema", message, ctx or None)


def schema_text(schema: Any, field: str) -> str:
    """``schema`` (a dict, or JSON text of one) checked against the JSON Schema meta-schema, as
    compact JSON text. Raises ``PydanticCustomError`` (a 400 naming ``field``)."""
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise _error("{field}: the schema is {n} characters, more than {max}", field=field, n=len(schema),
                         max=MAX_SCHEMA_CHARS)
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise _error("{field}: the schema is nested deeper than {max} levels; flatten it", field=field,
                         max=MAX_SCHEMA_DEPTH) from None
        except ValueError as e:
            raise _error("{field}: the schema is not valid JSON ({err})", field=field, err=str(e)[:200]) from None
    if not isinstance(schema, dict):
        raise _error("{field}: the schema must be a JSON object", field=field)
    regexes = _walk(schema, field)  # before json.dumps and jsonschema: both recurse
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _error("{field}: the schema is not JSON-serializable ({err})", field=field, err=str(e)[:200]) from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise _error("{field}: the schema is {n} characters, more than {max}", field=field, n=len(text),
                     max=MAX_SCHEMA_CHARS)
    import jsonschema  # Ray Serve's own dependency; imported here as only this path needs it

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise _error("{field}: not a valid JSON Schema at {where}: {err}", field=field, where=where,
                     err=e.message[:300]) from None
    except Exception as e:  # e.g. an unresolvable $schema dialect: the client's schema, not our fault
        raise _error("{field}: the schema could not be checked ({err})", field=field, err=str(e)[:200]) from None
    expansion = 0
    for where, pattern in regexes:  # valid regexes by now: the meta-schema's "regex" format compiled them
        expansion += regex_expansion(pattern, f"{field}{where}")
        if expansion > MAX_REGEX_NESTED_EXPANSION:
            raise _error("{field}: nested repetitions in the schema's patterns expand to {n} states (reached at "
                         "{where}), more than {max}; use smaller bounds inside repeated groups, nest repetitions "
                         "less, or use maxLength / maxItems", field=field, n=expansion, where=where[1:],
                         max=MAX_REGEX_NESTED_EXPANSION)
    return text


def _walk(schema: dict, field: str) -> list[tuple[str, str]]:
    """Check how deep ``schema`` nests (iteratively: nothing here can recurse out) and collect its
    regexes as (JSON path, pattern): ``pattern`` values and ``patternProperties`` keys, in schemas
    only (a property named "pattern", or a "pattern" key inside an ``enum`` value, is no regex)."""
    regexes: list[tuple[str, str]] = []
    stack: list[tuple[Any, str, str, int]] = [(schema, "", "schema", 1)]  # node, JSON path, kind, depth
    while stack:
        node, path, kind, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise _error("{field}: the schema is nested deeper than {max} levels (at {where}); flatten it",
                         field=field, max=MAX_SCHEMA_DEPTH, where=path[1:80])
        if isinstance(node, list):
            stack.extend((v, f"{path}/{i}", kind, depth + 1) for i, v in enumerate(node))
        elif isinstance(node, dict):
            for k, v in node.items():
                sub = f"{path}/{k}"
                if kind == "schema" and k == "pattern" and isinstance(v, str):
                    regexes.append((sub, v))
                elif kind == "schema" and k == "patternProperties" and isinstance(v, dict):
                    regexes.extend((f"{sub}/{p}", p) for p in v)
                    stack.append((v, sub, "names", depth + 1))
                else:
                    child = ("data" if kind == "data" or (kind == "schema" and k in _DATA_KEYWORDS) else
                             "names" if kind == "schema" and k in _NAME_MAPS else "schema")
                    stack.append((v, sub, child, depth + 1))
    return regexes


def regex_expansion(pattern: str, where: str) -> int:
    """How many states the nested bounded repetitions of ``pattern`` expand to (0 when no
    repetition holds another); raises a 400 for a bound over MAX_REGEX_REPEAT or nesting deeper
    than the limits. ``where`` names the pattern in the messages."""
    try:
        from re import _parser as sre_parse  # CPython 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = sre_parse.parse(pattern)
    except RecursionError:
        raise _error("{where}: the pattern's groups are nested deeper than {max}; flatten it", where=where,
                     max=MAX_REGEX_GROUP_DEPTH) from None
    except Exception as e:  # the meta-schema check compiled it; this parser is the same one
        raise _error("{where}: the pattern is not a valid regex ({err})", where=where, err=str(e)[:100]) from None
    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)} - {None}
    total = 0

    def walk(items, depth: int) -> tuple[int, int]:
        """(states ``items`` expand to, how deep counting quantifiers nest in it)."""
        nonlocal total
        if depth > MAX_REGEX_GROUP_DEPTH:
            raise _error("{where}: the pattern's groups are nested deeper than {max}; flatten it", where=where,
                         max=MAX_REGEX_GROUP_DEPTH)
        size = nest = 0
        for op, av in items:
            subs = ()
            if op in repeats:
                lo, hi, sub = av
                bound = lo if hi == sre_parse.MAXREPEAT else hi
                if bound > MAX_REGEX_REPEAT:
                    raise _error("{where}: the pattern repeats something {n} times, more than {max}; use a smaller "
                                 "bound, or maxLength / maxItems for long strings and arrays", where=where, n=bound,
                                 max=MAX_REGEX_REPEAT)
                inner, inner_nest = walk(sub, depth + 1)
                counts = hi > 1  # "?" and {0,1} repeat nothing
                n = inner_nest + counts
                if n > MAX_REGEX_NESTED_QUANTIFIERS:
                    raise _error("{where}: the pattern nests repetitions {n} deep, more than {max}; nest fewer "
                                 "quantifiers", where=where, n=n, max=MAX_REGEX_NESTED_QUANTIFIERS)
                expanded = max(bound, 1) * inner
                if counts and inner_nest:  # repeats something that repeats: the copies are states
                    total += expanded - inner  # (telescopes to the outermost expansion of a chain)
                size, nest = size + expanded, max(nest, n)
                continue
            if op is sre_parse.SUBPATTERN:
                subs = (av[3],)
            elif op is sre_parse.BRANCH:
                subs = av[1]
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                subs = (av[1],)
            elif op is getattr(sre_parse, "ATOMIC_GROUP", None):
                subs = (av,)
            elif op is sre_parse.GROUPREF_EXISTS:
                subs = tuple(b for b in av[1:] if b is not None)
            else:
                size += 1
            for b in subs:
                s, n = walk(b, depth + 1)
                size, nest = size + s, max(nest, n)
        return size, nest

    walk(parsed, 0)
    return total


def from_response_format(fmt: Any) -> str | None:
    """The schema text ``response_format`` asks for, or None for plain text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _error("response_format must be an object like {\"type\": \"json_object\"}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _error("response_format.json_schema must be an object with a \"schema\" (and a \"name\")")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:  # OpenAI: the schema is optional; without one, any JSON object
            return JSON_OBJECT_SCHEMA
        return schema_text(schema, "response_format.json_schema.schema")
    raise _error("response_format.type must be 'text', 'json_object' or 'json_schema' (got {got})",
                 got=repr(kind)[:40])


def from_request(data: dict) -> str | None:
    """The one schema a raw request body asks for across ``response_format``, ``guided_json`` and
    ``structured_outputs.json``; more than one constraint is refused."""
    found: list[tuple[str, str]] = []
    fmt = from_response_format(data.get("response_format"))
    if fmt is not None:
        found.append(("response_format", fmt))
    guided = data.get("guided_json")
    if guided is not None:
        found.append(("guided_json", schema_text(guided, "guided_json")))
    so = data.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"json"} or "json" not in so:
            raise _error("structured_outputs: only {\"json\": <schema>} is supported")
        found.append(("structured_outputs", schema_text(so["json"], "structured_outputs.json")))
    if len(found) > 1:
        raise _error("set only one of response_format, guided_json and structured_outputs (got {names})",
                     names=", ".join(n for n, _ in found))
    return found[0][1] if found else None
