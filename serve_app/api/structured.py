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
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import PydanticCustomError

MAX_SCHEMA_CHARS = 32 * 1024  # compiling is per distinct schema; keep one request's bounded
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
        except ValueError as e:
            raise _error("{field}: the schema is not valid JSON ({err})", field=field, err=str(e)[:200]) from None
    if not isinstance(schema, dict):
        raise _error("{field}: the schema must be a JSON object", field=field)
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
    return text


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
