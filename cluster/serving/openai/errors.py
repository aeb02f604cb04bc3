"""The error shape of the OpenAI-compatible HTTP API, `{"error": {"message", "type", "param", "code"}}`, and
`APIError`, the HTTP face of a `policy.ServingError` (its row of the error table gives status, type and code).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from llama4serve.cluster.serving.policy import ServingError


class ErrorInfo(BaseModel):
    message: str = Field(description="What was wrong and what to do.")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error.")
    param: str | None = Field(None, description="The request field at fault, e.g. messages[0].role.")
    code: str | None = Field(None, description="A machine-readable code, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    """Every error the API returns, in the OpenAI shape."""

    error: ErrorInfo


class APIError(Exception):
    """An error response in the OpenAI shape (see ErrorResponse)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @classmethod
    def of(cls, error: ServingError, param: str | None = None) -> "APIError":
        """The HTTP face of a ServingError: its row's status, OpenAI type and code (see policy.ERRORS)."""
        kind = error.kind
        return cls(kind.http_status, error.message, kind.openai_type, param or error.param, kind.openai_code,
                   dict(kind.http_headers) or None)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
