"""Tool calling on /v1/chat/completions: the request's tools and tool_choice checked, the tools put before the
model (by its chat template where the template renders tools, else in the system message, in the hermes format),
earlier calls and tool results written into the history the same way, and for tool_choice "required" or a named
function the grammar that forces a call whose arguments are valid against the function's parameters."""

import json
import re
from dataclasses import dataclass
from typing import Optional

from lmcli.engine import grammar
from lmcli.errors import UserError
from lmcli.serve.errors import APIError

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class ToolPlan:
    tools: list[dict]  # OpenAI's tool objects, checked
    mode: str  # none, auto, required, named
    name: Optional[str]  # the function tool_choice names
    parser: str  # a PARSERS name

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.mode != "none"


def plan(tools: Optional[list], choice, parallel: Optional[bool], parser: str) -> ToolPlan:
    """Check tools and tool_choice (400s naming the field); OpenAI's default choice is auto with tools, else none."""
    tools = tools or []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {...}} (the only tool type "
                                "served here)", f"tools.{i}")
        fn = tool["function"]
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise APIError(400, f"a function has no {', '.join(sorted(unknown))}", f"tools.{i}.function")
        if not isinstance(fn.get("name"), str) or not NAME.fullmatch(fn["name"]):
            raise APIError(400, "a function's name is 1 to 64 letters, digits, _ . or -", f"tools.{i}.function.name")
        for key, kind, what in (("description", str, "a string"), ("strict", bool, "true or false")):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise APIError(400, f"a function's {key} is {what}", f"tools.{i}.function.{key}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(400, "a function's parameters are a JSON schema (an object)",
                           f"tools.{i}.function.parameters")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "two tools have the same name", "tools")
    name = None
    if choice is None:
        mode = "auto" if tools else "none"
    elif isinstance(choice, str) and choice in ("none", "auto", "required"):
        mode = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        mode, name = "named", choice["function"].get("name")
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    else:
        raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice")
    if mode in ("required", "named") and not tools:
        raise APIError(400, f"tool_choice {mode!r} needs tools", "tool_choice")
    return ToolPlan(tools, mode, name, parser)


def renders_tools(template: Optional[str]) -> bool:
    """Whether a chat template puts tools before the model itself (it reads the `tools` variable)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def call_text(parser: str, name: str, arguments) -> str:
    """An earlier call as the model writes it in this format."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    if parser == "llama3_json":
        return f'{{"name": {json.dumps(name)}, "parameters": {args}}}'
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'


def tools_prompt(tools: list[dict]) -> str:
    """The tools and the hermes call format, for the system message of a model whose template has no tools."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions (tools) to help answer. They are described here, one JSON object per line, "
            f"inside <tools></tools>:\n<tools>\n{lines}\n</tools>\n\nTo call one, answer with its name and arguments "
            "as a JSON object inside <tool_call></tool_call> tags, one pair of tags per call:\n<tool_call>\n"
            '{"name": "the function\'s name", "arguments": {"parameter": "value"}}\n</tool_call>\n'
            "The results come back inside <tool_response></tool_response> tags.")


def history(messages: list[dict], template: Optional[str], parser: str) -> list[dict]:
    """Earlier calls and tool results for the template: as the template takes them where it renders tools (the
    arguments as objects), else as text in the format the model is taught (results in a user message)."""
    native = renders_tools(template)
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            if calls:
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _loaded(
                    c["function"]["arguments"])}} for c in calls]}
            out.append(m)
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif calls:
            text = "\n".join(call_text(parser, c["function"]["name"], c["function"]["arguments"]) for c in calls)
            out.append({"role": m["role"], "content": (m["content"] + "\n" if m["content"] else "") + text})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def with_tools(messages: list[dict], tools: list[dict], system: Optional[str]) -> list[dict]:
    """The tools in the system message (a template without tools): after the request's system message, or the
    server's --meta-instruction, if any."""
    prompt = tools_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}] + messages[1:]
    return [{"role": "system", "content": (system + "\n\n" if system else "") + prompt}] + messages


def forced_grammar(p: ToolPlan, parallel: bool) -> Optional[str]:
    """For tool_choice required or a named function: a grammar that allows only calls, in the parser's format,
    with arguments valid against the function's parameters (one call, or several with parallel_tool_calls)."""
    if p.mode not in ("required", "named"):
        return None
    key = "parameters" if p.parser == "llama3_json" else "arguments"
    options = grammar.JSON_OPTIONS
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", key],
              "properties": {"name": {"const": t["function"]["name"]},
                             key: t["function"].get("parameters") or {"type": "object"}}}
             for t in p.tools if p.mode == "required" or t["function"]["name"] == p.name]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": options}
    if p.parser == "llama3_json":
        rules = ['start: call ("; " call)*' if parallel else "start: call", f"call: %json {json.dumps(schema)}"]
    else:
        rules = ['start: call ("\\n" call)*' if parallel else "start: call",
                 'call: "<tool_call>\\n" body "\\n</tool_call>"', f"body: %json {json.dumps(schema)}"]
    try:
        return grammar.check(grammar.lark("\n".join(rules)), "tools")
    except (UserError, ValueError) as e:
        raise APIError(400, f"the tools' parameters cannot be enforced: {e}", "tools") from None


def _loaded(arguments):
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments

