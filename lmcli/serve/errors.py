"""Errors as OpenAI sends them: {"error": {"message", "type", "param", "code"}} with the right status."""

import json
from typing import Optional

from pydantic import ValidationError
from starlette.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         409: "conflict_error", 410: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable", 504: "timeout", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer", **self.headers} if self.status == 401 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def from_validation(e: ValidationError) -> APIError:
    """The first problem pydantic found, said plainly, with its field path as `param`."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"] if not _is_union_branch(x)]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unsupported field {param!r}: this server does not accept it", param,
                        "unsupported_field")
    if err["type"] == "missing":
        return APIError(400, f"{param!r} is required", param, "missing_field")
    value = json.dumps(err.get("input"), default=str)[:80]
    return APIError(400, f"{param}: {err['msg']} (got {value})" if param else err["msg"], param, "invalid_value")


def _is_union_branch(x) -> bool:
    # pydantic names the union member it tried, e.g. 'str' or 'list[TextPart]'; not part of the field path
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x or x[:1].isupper())
