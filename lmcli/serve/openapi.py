"""/openapi.json: an OpenAPI 3.0.3 document made from the pydantic models, one entry per route below. 3.0, not
3.1: the Swagger UI we ship (swagger-ui-bundle) and many client generators read only 3.0, so pydantic's JSON
Schema (2020-12) is rewritten into 3.0's dialect (nullable, enum, boolean exclusive bounds)."""

import copy
from functools import lru_cache

from pydantic.json_schema import models_json_schema

from lmcli.serve import protocol as p
from lmcli.serve.openapi_requests import refine

JSON, SSE, NDJSON = "application/json", "text/event-stream", "application/x-ndjson"

# (path, method, operationId, summary, request model, response model, streamed as)
ROUTES = [
    ("/v1/models", "get", "listModels", "The served model", None, p.ModelList, None),
    ("/v1/chat/completions", "post", "createChatCompletion",
     "OpenAI chat completion; with stream=true, server-sent events of ChatCompletionChunk ending with [DONE]",
     p.ChatCompletionRequest, p.ChatCompletionResponse, (SSE, p.ChatCompletionChunk)),
    ("/v1/completions", "post", "createCompletion",
     "OpenAI text completion; with stream=true, server-sent events of CompletionResponse ending with [DONE]",
     p.CompletionRequest, p.CompletionResponse, (SSE, p.CompletionResponse)),
    ("/v1/chat/interactive", "post", "chatInteractive",
     "LMDeploy's session chat: the server keeps the history with interactive_mode=true; with stream=true, one "
     "InteractiveResponse per line", p.InteractiveRequest, p.InteractiveResponse, (NDJSON, p.InteractiveResponse)),
    ("/v1/encode", "post", "encode", "Token ids of a text or texts", p.EncodeRequest, p.EncodeResponse, None),
    ("/health", "get", "health", "200 when the engine can generate, 503 while loading or broken", None, p.Health,
     None),
]

ERRORS = {"400": "Bad request: malformed JSON, a wrong type, a value out of range, an unsupported field, a prompt "
                 "longer than the context", "401": "Missing or wrong API key", "404": "Unknown model",
          "409": "The session is busy with another request",
          "413": "The request body is over 32 MiB",
          "429": "Too many requests: --max-concurrent-requests reached and the queue (--max-queue-len) full, or "
                 "every interactive session busy (--max-sessions); Retry-After says when to try again",
          "503": "The model is loading, the engine stopped, the server is shutting down, or no place came free "
                 "within --queue-timeout (Retry-After)",
          "504": "The request ran past --request-timeout (counted from its arrival)"}
# /v1/chat/interactive's own
SESSION_ENDED = ("The server ended the session (idle past --session-ttl, or the least recently used past "
                 "--max-sessions): its history is gone; this turn did not run, and sent again it starts the session "
                 "afresh")


@lru_cache(maxsize=None)
def openapi_schema(version: str) -> dict:
    models = {p.ErrorResponse}
    for route in ROUTES:
        models |= {m for m in (route[4], route[5]) if m is not None}
        if route[6]:
            models.add(route[6][1])
    keyed = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    _, top = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    schemas = {name: to_openapi30(schema) for name, schema in top.get("$defs", {}).items()}
    refine(schemas)
    for name in strict_models() & schemas.keys():  # requests: null for any optional field means its default
        required = set(schemas[name].get("required", ()))
        for field, prop in schemas[name].get("properties", {}).items():
            if field not in required and not prop.get("nullable"):
                schemas[name]["properties"][field] = nullable(prop)
    ref = lambda m: {"$ref": f"#/components/schemas/{m.__name__}"}  # noqa: E731
    paths: dict = {}
    for path, method, op_id, summary, request, response, streamed in ROUTES:
        content = {JSON: {"schema": ref(response)}}
        if streamed:  # a stream's events, or an error event where the answer had to end early
            content[streamed[0]] = {"schema": {"oneOf": [ref(streamed[1]), ref(p.ErrorResponse)]}}
        op = {"operationId": op_id, "summary": summary,
              "responses": {"200": {"description": "OK", "content": content}}}
        if request is not None:
            op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(request)}}}
            for code, text in ERRORS.items():
                op["responses"][code] = {"description": text, "content": {JSON: {"schema": ref(p.ErrorResponse)}}}
        elif path != "/health":
            op["responses"]["401"] = {"description": ERRORS["401"],
                                      "content": {JSON: {"schema": ref(p.ErrorResponse)}}}
        if path == "/v1/chat/interactive":
            op["responses"]["410"] = {"description": SESSION_ENDED, "content": {JSON: {"schema": ref(p.ErrorResponse)}}}
        if path == "/health":
            op["responses"]["503"] = {"description": "Loading, broken or shutting down: status and message say which",
                                      "content": {JSON: {"schema": ref(response)}}}
        if path.startswith("/v1/"):
            op["security"] = [{"bearer": []}, {}]
        paths[path] = {method: op}
    paths["/metrics"] = {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "responses": {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "lm api_server", "version": version,
                 "description": "An OpenAI-compatible API served by lm's engine, with LMDeploy's interactive "
                                "sessions. Errors are OpenAI error bodies."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Only when the server runs with --api-keys"}}},
    }


NODE = {"type": "object", "properties": {"url": {"type": "string", "example": "http://127.0.0.1:23333"}},
        "required": ["url"]}


def proxy_openapi(version: str) -> dict:
    """The proxy's document: the api_server's routes (forwarded to the nodes, so the same contract), its node
    management, 410 for a session whose node was lost, and 429/503 from its admission queue."""
    doc = copy.deepcopy(openapi_schema(version))
    doc["info"] = {"title": "lm proxy", "version": version,
                   "description": "One address in front of several lm api_servers: the same API, spread over the "
                                  "nodes; interactive sessions stay on the node that holds their history."}
    error = {"content": {JSON: {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/encode"):
        responses = doc["paths"][path]["post"]["responses"]
        responses["429"] = {"description": "Every node is at its limit and the proxy's queue is full (Retry-After)",
                            **error}
        responses["503"] = {"description": "No node can take the request, or none had room within the queue's "
                                           "timeout", **error}
    doc["paths"]["/v1/chat/interactive"]["post"]["responses"]["410"] = {
        "description": "The node holding the session is gone, or it ended the session: its history is lost; the "
                       "next turn starts afresh", **error}
    status = {"200": {"description": "The node table", "content": {JSON: {"schema": {"type": "object"}}}}}
    doc["paths"]["/nodes/status"] = {"get": {"operationId": "nodeStatus", "summary": "Each node's URL, models, "
                                             "state, load, requests and errors", "responses": status}}
    for name, summary in (("add", "Add an api_server (it must answer /health)"), ("remove", "Remove a node")):
        doc["paths"][f"/nodes/{name}"] = {"post": {
            "operationId": f"{name}Node", "summary": summary,
            "requestBody": {"required": True, "content": {JSON: {"schema": NODE}}},
            "responses": {"200": {"description": "Done", "content": {JSON: {"schema": {"type": "object"}}}},
                          "400": {"description": "No URL, or the node does not answer", **error},
                          "404": {"description": "No such node", **error}}}}
    return doc


def strict_models() -> set:
    """The names of the request models (protocol.Strict's subclasses, at any depth)."""
    out, todo = set(), [p.Strict]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.add(sub.__name__)
            todo.append(sub)
    return out


def nullable(prop: dict) -> dict:
    if "$ref" in prop:  # a $ref takes no siblings in 3.0
        extra = {k: v for k, v in prop.items() if k != "$ref"}
        return {"allOf": [{"$ref": prop["$ref"]}], **extra, "nullable": True}
    return {**prop, "nullable": True}


def to_openapi30(node):
    """JSON Schema 2020-12 as pydantic writes it, in OpenAPI 3.0's dialect."""
    if isinstance(node, list):
        return [to_openapi30(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: to_openapi30(v) for k, v in node.items()}
    if "anyOf" in node and {"type": "null"} in node["anyOf"]:
        rest = [x for x in node.pop("anyOf") if x != {"type": "null"}]
        if len(rest) == 1 and "$ref" in rest[0]:
            node["allOf"] = rest  # a $ref takes no siblings in 3.0
        elif len(rest) == 1:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
        node["nullable"] = True
        if "enum" in node and None not in node["enum"]:  # 3.0: a nullable enum lists null too
            node["enum"] = [*node["enum"], None]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):
            node[plain], node[bound] = node[bound], True
    return node
