"""What the request models' own schemas cannot say, written into /openapi.json so that it promises what the
server does: each role's message, response_format's and tools' shapes, the values a neutral field takes,
non-empty prompts and stop strings, null-only fields. Rules between fields (stream_options needs stream,
best_of equals n, a named tool_choice is among the tools...) are in the fields' descriptions: OpenAPI 3.0
cannot state them."""

import json

from lmcli.serve import protocol as p

REF = "#/components/schemas/"
NULL_ONLY = {"enum": [None], "nullable": True}
TEXT = {"type": "string", "minLength": 1}


def ref(name: str) -> dict:
    return {"$ref": REF + name}


def accepted(values: tuple, why: str) -> dict:
    """A neutral field: the values that ask for nothing, and why no other is served."""
    kept = [v for v in values if v is not None]
    kind = {bool: "boolean", str: "string", list: "array", int: "integer", float: "number", dict: "object"}
    out = {"description": f"Only {' or '.join(map(json.dumps, values))}: {why}."}
    if kept:
        out.update(type=kind[type(kept[0])], enum=kept + [None], nullable=True)  # null: the default
        if isinstance(kept[0], list):
            out["items"] = {"type": "string"}
    else:
        out.update(NULL_ONLY)
    return out


def nulls(*keys) -> dict:
    """Fields that may be sent, as null only (null means not there)."""
    return {k: NULL_ONLY for k in keys}


def message_schemas(base: dict) -> dict:
    """One schema per role (OpenAI's shape), chosen by `role`; base: pydantic's single Message schema."""
    props = base["properties"]
    others = ("image_url", "input_audio", "file")
    text_part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"},
                                **nulls("refusal", *others)}}
    refusal_part = {"type": "object", "required": ["type", "refusal"], "additionalProperties": False,
                    "properties": {"type": {"type": "string", "enum": ["refusal"]},
                                   "refusal": {"type": "string"}, **nulls("text", *others)}}
    call = {"type": "object", "required": ["function"],
            "properties": {"id": {"type": "string", "nullable": True}, "type": {"type": "string", "enum": ["function"]},
                           "function": {"type": "object", "required": ["name", "arguments"],
                                        "properties": {"name": {"type": "string"},
                                                       "arguments": {"type": "string",
                                                                     "description": "JSON text"}}}}}

    def content(parts: list, required: bool) -> dict:
        out = {"anyOf": [{"type": "string"}, {"type": "array", "items": parts[0] if len(parts) == 1
                                              else {"oneOf": parts}}], "description": props["content"]["description"]}
        return out if required else {**out, "nullable": True}

    def message(roles: list, content_schema: dict, required: list, **extra) -> dict:
        """extra: the fields this role owns; another role's are null only (tool_calls also [])."""
        others = {**nulls(*p.ROLE_FIELDS), "tool_calls": {"type": "array", "maxItems": 0, "items": call,
                                                           "nullable": True}}
        return {"type": "object", "additionalProperties": False, "required": required,
                "properties": {"role": {"type": "string", "enum": roles, "description": props["role"]["description"]},
                               "content": content_schema, "name": props["name"], **nulls("function_call", "audio"),
                               **others, **extra}}

    text = content([text_part], True)
    assistant = message(["assistant"], content([text_part, refusal_part], False), ["role"], refusal=props["refusal"],
                        tool_calls={"type": "array", "items": call, "nullable": True,
                                    "description": props["tool_calls"]["description"]})
    assistant["description"] = "An assistant's earlier answer: content, a refusal or tool_calls (at least one of " \
                               "them not null)."
    both = ["role", "content"]
    out = {"SystemMessage": message(["system"], text, both), "DeveloperMessage": message(["developer"], text, both),
           "UserMessage": message(["user"], text, both),
           "AssistantMessage": assistant,
           "ToolMessage": message(["tool"], text, both, tool_call_id=props["tool_call_id"])}
    roles = {"system": "SystemMessage", "developer": "DeveloperMessage", "user": "UserMessage",
             "assistant": "AssistantMessage", "tool": "ToolMessage"}
    out["Message"] = {"oneOf": [ref(n) for n in out], "description": "A message; its role decides its fields.",
                      "discriminator": {"propertyName": "role", "mapping": {r: REF + n for r, n in roles.items()}}}
    return out


RESPONSE_FORMAT = {"oneOf": [  # each type's own field, the others null only (LMDeploy's client sends them so)
    {"type": "object", "required": ["type"], "additionalProperties": False,
     "properties": {"type": {"type": "string", "enum": ["text", "json_object"]},
                    **nulls("json_schema", "regex_schema")}},
    {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
     "properties": {"type": {"type": "string", "enum": ["json_schema"]}, **nulls("regex_schema"), "json_schema": {
         "type": "object", "additionalProperties": False,
         "properties": {"name": {"type": "string", "nullable": True},
                        "description": {"type": "string", "nullable": True},
                        "schema": {"type": "object", "nullable": True,
                                   "description": "A JSON schema; a keyword that cannot be enforced is a 400"},
                        "strict": {"type": "boolean", "nullable": True}}}}},
    {"type": "object", "required": ["type", "regex_schema"], "additionalProperties": False,
     "properties": {"type": {"type": "string", "enum": ["regex_schema"]}, **nulls("json_schema"),
                    "regex_schema": {**TEXT, "description": "A regular expression the whole output matches"}}},
]}

TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}(?!\\n)$"},  # (a final newline is not $)
        "description": {"type": "string", "nullable": True},
        "parameters": {"type": "object", "nullable": True, "description": "A JSON schema for the arguments"},
        "strict": {"type": "boolean", "nullable": True}}}}}

TOOL_CHOICE = {"anyOf": [
    {"type": "string", "enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}


def refine(schemas: dict) -> None:
    """Rewrite the request schemas in place (pydantic's, already in OpenAPI 3.0's dialect)."""
    chat, completion, interactive = (schemas[n]["properties"] for n in
                                     ("ChatCompletionRequest", "CompletionRequest", "InteractiveRequest"))
    for props, tables in ((chat, (p.NEUTRAL, p.ROUTER_NEUTRAL, p.CHAT_ROUTER_NEUTRAL)),
                          (completion, (p.ROUTER_NEUTRAL,))):
        for table in tables:
            for field, (values, why) in table.items():
                props[field] = accepted(values, why)
    for props in (chat, completion, interactive):
        props["kwargs"] = {"type": "object", "maxProperties": 0, "nullable": True,
                           "description": props["kwargs"]["description"]}
        props["stop"] = {"anyOf": [TEXT, {"type": "array", "items": TEXT}], "nullable": True,
                         "description": props["stop"].get("description", "Strings that end the output.")}
        props["response_format"] = {"allOf": [ref("ResponseFormat")], "nullable": True,
                                    "description": props["response_format"]["description"]}
    for props in (chat, completion):
        props["logit_bias"]["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}
    chat["tools"]["items"] = TOOL
    chat["tool_choice"] = {**TOOL_CHOICE, "nullable": True, "description": chat["tool_choice"]["description"]}
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    completion["prompt"] = {"anyOf": [TEXT, {"type": "array", "minItems": 1, "items": TEXT}, ids,
                                      {"type": "array", "minItems": 1, "items": ids}],
                            "description": completion["prompt"]["description"]}
    for field in ("adapter_name", "image_url"):
        interactive[field] = {**NULL_ONLY, "description": interactive[field]["description"]}
    schemas.update(message_schemas(schemas["Message"]), ResponseFormat=RESPONSE_FORMAT)
    del schemas["ContentPart"]
