"""JSON Schema validators whose cost and messages stay bounded whatever the request holds.

jsonschema's keyword functions put ``repr(instance)`` in every message: a 60 MB string in the
wrong place became a 60 MB message (and several copies of it in memory), echoed back in the
422. The keywords that print their instance are replaced here by ones that print a short
:func:`excerpt`; they check exactly what jsonschema's own check.

Cost: ``items`` of an array longer than its schema's ``maxItems`` is not checked item by item
(``maxItems`` already refuses it), so an oversize array costs one error, not one per item.

Integers follow JSON Schema 2020-12 (the contract's dialect): ``1.0`` is an integer, as it is
for every generator of valid requests; Draft 4's checker would refuse it.
"""

from __future__ import annotations

import re

from connexion.json_schema import Draft4RequestValidator, allow_nullable
from jsonschema import Draft4Validator, Draft7Validator, ValidationError
from jsonschema._utils import equal, uniq
from jsonschema.validators import extend

from kiapi.runtime.errors import excerpt


def _items(base):
    def items(validator, items, instance, schema):
        limit = schema.get("maxItems")
        if isinstance(instance, list) and isinstance(limit, int) and len(instance) > limit:
            return  # maxItems reports it; per-item errors would cost one each
        yield from base(validator, items, instance, schema)

    return items


def _type(validator, types, instance, schema):
    types = [types] if isinstance(types, str) else types
    if not any(validator.is_type(instance, type_) for type_ in types):
        yield ValidationError(f"{excerpt(instance)} is not of type {', '.join(map(repr, types))}")


def _enum(validator, enums, instance, schema):
    if all(not equal(each, instance) for each in enums):
        yield ValidationError(f"{excerpt(instance)} is not one of {excerpt(enums)}")


def _length(kind: str, too: str):
    def check(validator, limit, instance, schema):
        if validator.is_type(instance, kind):
            size = len(instance)
            if (too == "long" and size > limit) or (too == "short" and size < limit):
                bound = "at most" if too == "long" else "at least"
                unit = "characters" if kind == "string" else "items"
                yield ValidationError(
                    f"{excerpt(instance)} is too {too}: {size} {unit}, {bound} {limit} allowed"
                )

    return check


def _unique_items(validator, unique, instance, schema):
    if unique and validator.is_type(instance, "array") and not uniq(instance):
        yield ValidationError(f"{excerpt(instance)} has non-unique elements")


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not re.search(pattern, instance):
        yield ValidationError(f"{excerpt(instance)} does not match {pattern!r}")


def _format(validator, format_, instance, schema):
    if validator.format_checker is not None and not validator.format_checker.conforms(
        instance, format_
    ):
        yield ValidationError(f"{excerpt(instance)} is not a {format_!r}")


def _any_of(validator, any_of, instance, schema):
    errors = []
    for index, subschema in enumerate(any_of):
        branch = list(validator.descend(instance, subschema, schema_path=index))
        if not branch:
            return
        errors.extend(branch)
    yield ValidationError(
        f"{excerpt(instance)} is not valid under any of the given schemas", context=errors
    )


def _one_of(validator, one_of, instance, schema):
    valid, errors = [], []
    for index, subschema in enumerate(one_of):
        branch = list(validator.descend(instance, subschema, schema_path=index))
        if branch:
            errors.extend(branch)
        else:
            valid.append(index)
    if not valid:
        yield ValidationError(
            f"{excerpt(instance)} is not valid under any of the given schemas", context=errors
        )
    elif len(valid) > 1:
        yield ValidationError(f"{excerpt(instance)} is valid under more than one schema")


def _not(validator, not_schema, instance, schema):
    if validator.evolve(schema=not_schema).is_valid(instance):
        yield ValidationError(f"{excerpt(instance)} should not be valid under {not_schema!r}")


def _bounded(base: type[Draft4Validator], *, nullable: bool) -> type[Draft4Validator]:
    wrap = allow_nullable if nullable else (lambda fn: fn)
    return extend(
        base,
        {
            "items": _items(base.VALIDATORS["items"]),
            "type": wrap(_type),
            "enum": wrap(_enum),
            "maxLength": _length("string", "long"),
            "minLength": _length("string", "short"),
            "maxItems": _length("array", "long"),
            "minItems": _length("array", "short"),
            "maxProperties": _length("object", "long"),
            "minProperties": _length("object", "short"),
            "uniqueItems": _unique_items,
            "pattern": _pattern,
            "format": _format,
            # a nullable union (a 3.1 ``anyOf`` with ``{"type": "null"}``, converted to 3.0's
            # ``nullable``) accepts null, as ``type`` and ``enum`` do
            "anyOf": wrap(_any_of),
            "oneOf": wrap(_one_of),
            "not": _not,
        },
        type_checker=base.TYPE_CHECKER.redefine(
            "integer", Draft7Validator.TYPE_CHECKER._type_checkers["integer"]
        ),
    )


BoundedValidator = _bounded(Draft4Validator, nullable=False)
"""Draft 4 with bounded messages and 2020-12 integers: for parameters and form fields."""

BoundedRequestValidator = _bounded(Draft4RequestValidator, nullable=True)
"""Connexion's request validator (``nullable`` honoured) with the same bounds: for bodies."""
