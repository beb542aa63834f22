"""Structured output fails closed: every JSON-schema keyword the grammar library cannot enforce is refused by
name, never dropped; what it enforces compiles."""

import pytest

from lmcli.engine import grammar
from lmcli.errors import UserError

UNENFORCEABLE = {
    "not": {"not": {"type": "string"}},
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "if": {"if": {"type": "string"}, "then": {"minLength": 2}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "dependentSchemas": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^a"}},
    "unevaluatedProperties": {"type": "object", "unevaluatedProperties": False},
    "$dynamicRef": {"$dynamicRef": "#x"},
    "hostname-xyz": {"type": "string", "format": "hostname-xyz"},  # an unknown format
}


@pytest.mark.parametrize("keyword", UNENFORCEABLE)
def test_a_keyword_that_cannot_be_enforced_is_refused_by_name(keyword):
    shape = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNENFORCEABLE[keyword]}}
    with pytest.raises(UserError) as e:
        grammar.grammar_of(shape)
    assert e.value.param == "response_format" and keyword in str(e.value)


def test_what_is_enforced_compiles():
    schema = {"type": "object", "required": ["a"], "additionalProperties": False, "minProperties": 1,
              "properties": {"a": {"type": "integer", "multipleOf": 3, "exclusiveMinimum": 0},
                             "b": {"oneOf": [{"type": "string", "maxLength": 4}, {"enum": [1, 2]}]},
                             "c": {"type": "array", "prefixItems": [{"const": "x"}], "maxItems": 3},
                             "d": {"type": "string", "format": "date-time"}}}
    assert '"multipleOf":3' in grammar.grammar_of({"type": "json_schema", "json_schema": {"schema": schema}})
    assert grammar.grammar_of({"type": "regex_schema", "regex_schema": "[a-z]+"})
    assert grammar.grammar_of({"type": "text"}) is None and grammar.grammar_of(None) is None
