"""Whether a JSON schema admits a finite value: `$ref` cycles with no way out are refused.

A schema such as `{"$defs": {"n": {"type": "object", "properties": {"next": {"$ref":
"#/$defs/n"}}, "required": ["next"]}}, "$ref": "#/$defs/n"}` compiles in llguidance, but
no finite JSON satisfies it: every `next` needs another. A row constrained by it stops
after a token or two with a parser error, so the user would get an empty answer instead
of a 400. Same for `{"$ref": "#"}` and for an array that must hold at least one of itself.

The check is a least fixpoint over the schema's nodes: a node is *finite* when a finite
value can satisfy it, given what is already known finite. Leaves (strings, numbers,
booleans, null, enums, consts, a schema with no structure) are finite at once; an object
needs its required properties finite, an array its first `minItems` items, `$ref` and
`allOf` all of their targets, `anyOf`/`oneOf` one branch, a list of types one type. Nodes
never proven finite sit on a cycle every value must follow; the schema is refused when a
value can reach one (the root, or any schema a property, item or `$ref` leads to). Where
the check cannot tell (a `$ref` it cannot resolve), it assumes finite and leaves the
verdict to the compiler.
"""

from __future__ import annotations

from typing import Any

from vision_queue.errors import InvalidInput

_LEAF_TYPES = frozenset({"string", "number", "integer", "boolean", "null"})
_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_DEFINITIONS = ("$defs", "definitions")
_SUBSCHEMA_MAPS = ("properties", *_DEFINITIONS, "patternProperties", "dependentSchemas")


def require_finite(root: dict[str, Any], field: str) -> None:
    """InvalidInput naming `field` when no finite JSON value satisfies `root`."""
    nodes = _nodes(root)
    walked = {id(node) for node in nodes}
    finite: set[int] = set()
    changed = True
    while changed:  # each pass proves at least one more node, or ends
        changed = False
        for node in nodes:
            if id(node) not in finite and _is_finite(node, root, finite, walked):
                finite.add(id(node))
                changed = True
    if any(id(node) not in finite for node in _nodes(root, follow_refs=True)):
        raise InvalidInput(
            "response_format schema admits no finite JSON value: a $ref cycle that every "
            "value must follow (make the recursive property optional or nullable)",
            field=field,
        )


def _nodes(root: dict[str, Any], *, follow_refs: bool = False) -> list[dict[str, Any]]:
    """Every schema object under `root`, each once; or, following refs, those a value can
    reach (a definition nobody refers to is never generated, so it may be anything)."""
    seen: dict[int, dict[str, Any]] = {}
    stack: list[Any] = [root]
    maps = [key for key in _SUBSCHEMA_MAPS if not follow_refs or key not in _DEFINITIONS]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen[id(node)] = node
        if follow_refs and "$ref" in node:
            stack.append(_resolve(root, node["$ref"]))
        stack.extend(node.get(key) for key in _SUBSCHEMA_KEYS)
        for key in _SUBSCHEMA_LISTS:
            value = node.get(key)
            if isinstance(value, list):
                stack.extend(value)
        for key in maps:
            value = node.get(key)
            if isinstance(value, dict):
                stack.extend(value.values())
    return list(seen.values())


def _is_finite(
    node: dict[str, Any], root: dict[str, Any], finite: set[int], walked: set[int]
) -> bool:
    def known(schema: Any) -> bool:
        # `true`, a missing schema, or one outside the walk (the compiler judges it).
        return not isinstance(schema, dict) or id(schema) in finite or id(schema) not in walked

    if "$ref" in node:
        target = _resolve(root, node["$ref"])
        if target is not None and not known(target):
            return False
    all_of = node.get("allOf")
    if isinstance(all_of, list) and not all(known(s) for s in all_of):
        return False
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches and not any(known(s) for s in branches):
            return False
    if "const" in node or "enum" in node:
        return True
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not isinstance(kinds, list):  # no type: whatever the keywords below allow
        kinds = [
            kind for kind, present in (
                ("object", "required" in node), ("array", "minItems" in node)
            ) if present
        ] or ["string"]
    return any(_kind_is_finite(kind, node, known) for kind in kinds)


def _kind_is_finite(kind: Any, node: dict[str, Any], known: Any) -> bool:
    if kind in _LEAF_TYPES:
        return True
    if kind == "object":
        properties = node.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = node.get("required")
        names = required if isinstance(required, list) else []
        extra = node.get("additionalProperties")
        return all(known(properties.get(name, extra)) for name in names)
    if kind == "array":
        least = node.get("minItems", 0)
        if not isinstance(least, int) or least <= 0:
            return True
        prefix = node.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        needed = [prefix[i] if i < len(prefix) else node.get("items") for i in range(least)]
        return all(known(schema) for schema in needed[: len(prefix) + 1])
    return True  # an unknown type: the compiler refuses it


def _resolve(root: dict[str, Any], ref: Any) -> Any:
    """The schema a local `$ref` (`#`, `#/$defs/x`, any JSON pointer) names; None if unknown."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
