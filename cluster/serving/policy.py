"""Ingress policy shared by the HTTP and gRPC faces: the API key, the admission bound, and the one error table.

Every failure of a request becomes a `ServingError`: a row of `ERRORS` (what kind of failure) and a one-line
message. HTTP answers the row's status in OpenAI's error shape (`openai/errors.APIError.of`), gRPC the row's
status code (`grpc/service.py`), so the same engine error is a 503 over HTTP and UNAVAILABLE over gRPC.
`classify` turns any exception out of the engine into one. Faults (500, 503) are logged at ERROR with their
traceback; client errors are not faults and are never logged with one (`QuietClientErrors` also makes Ray
Serve's own request logging say them in one INFO line).

No torch, grpc or FastAPI here: the Ingress runs in a CPU pod, and each protocol maps a row itself.
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass

logger = logging.getLogger("ray.serve")  # in the Ingress replica: its Serve log file, with the request id


@dataclass(frozen=True)
class ErrorKind:
    """One row of the error table."""

    name: str
    http_status: int
    openai_type: str  # OpenAI's error.type
    openai_code: str | None  # OpenAI's error.code
    grpc_code: str  # a grpc.StatusCode name
    fault: bool = False  # the server's failure, not the client's: logged at ERROR with the traceback
    http_headers: tuple[tuple[str, str], ...] = ()


ERRORS = (
    BAD_INPUT := ErrorKind("bad_input", 400, "invalid_request_error", None, "INVALID_ARGUMENT"),
    UNAUTHENTICATED := ErrorKind("unauthenticated", 401, "authentication_error", "invalid_api_key",
                                 "UNAUTHENTICATED", http_headers=(("WWW-Authenticate", "Bearer"),)),
    NOT_FOUND := ErrorKind("not_found", 404, "invalid_request_error", "model_not_found", "NOT_FOUND"),
    TOO_LARGE := ErrorKind("too_large", 413, "invalid_request_error", "request_too_large", "RESOURCE_EXHAUSTED"),
    OVERLOADED := ErrorKind("overloaded", 429, "rate_limit_error", "rate_limit_exceeded", "RESOURCE_EXHAUSTED",
                            http_headers=(("Retry-After", "1"),)),
    INTERNAL := ErrorKind("internal", 500, "server_error", None, "INTERNAL", fault=True),
    UNAVAILABLE := ErrorKind("unavailable", 503, "server_error", None, "UNAVAILABLE", fault=True),
    DEADLINE := ErrorKind("deadline", 504, "server_error", "timeout", "DEADLINE_EXCEEDED"),
)

# Exceptions out of the engine -> rows, by class name (the engine's classes import torch; Ray's need Ray). A
# RayTaskError raised for a remote exception also has the remote exception's class in its MRO.
_ENGINE_ERRORS = (
    (("ValueError",), BAD_INPUT),
    (("BackPressureError",), OVERLOADED),
    (("DataPlaneError", "DeploymentUnavailableError", "RayActorError", "ActorDiedError", "ActorUnavailableError",
      "ActorUnschedulableError"), UNAVAILABLE),
    (("TimeoutError",), DEADLINE),
)


class ServingError(Exception):
    """A failed request: its row of ERRORS and a one-line message (no traceback, no object reprs).

    Picklable (all constructor arguments are in `args`): it may cross from a Serve replica to the proxy.
    """

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None):
        super().__init__(kind, message, param)
        self.kind, self.message, self.param = kind, message, param

    def __str__(self) -> str:
        return self.message


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of `text`, without colour codes or `<... object at 0x...>` reprs."""
    text = _REPR.sub("", _ANSI.sub("", text))
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def root_exception(exc: BaseException) -> BaseException:
    """Ray wraps a remote exception in a RayTaskError whose str() holds a traceback; `cause` is what was raised."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _engine_kind(exc: BaseException) -> ErrorKind | None:
    for candidate in (root_exception(exc), exc):
        names = {cls.__name__ for cls in type(candidate).__mro__}
        for classes, kind in _ENGINE_ERRORS:
            if names.intersection(classes):
                return kind
    return None


def classify(exc: BaseException, what: str = "request") -> ServingError:
    """The ServingError for an exception out of the engine (or the ingress); faults are logged here, as `what`."""
    if isinstance(exc, ServingError):
        return exc
    root = root_exception(exc)
    if isinstance(root, ServingError):
        return root
    kind = _engine_kind(exc)
    reason = one_line(str(root)) or type(root).__name__
    if kind is BAD_INPUT:
        return ServingError(BAD_INPUT, reason.removeprefix("SamplingParams."))
    if kind is OVERLOADED:
        return ServingError(OVERLOADED, "the model's request queue is full; retry later")
    if kind is DEADLINE:
        return ServingError(DEADLINE, f"the request timed out ({reason}); retry, or ask for fewer tokens")
    if kind is UNAVAILABLE:
        error = ServingError(UNAVAILABLE, f"the model instance is unavailable ({reason}); retry later")
    else:
        error = ServingError(INTERNAL, f"internal error while serving the request ({type(root).__name__}: {reason})")
    logger.error("%s failed: %s", what, error.message, exc_info=exc)
    return error


def check_api_key(authorization: str | bytes | None, api_key: str | None, how: str) -> ServingError | None:
    """None when no key is required or `authorization` is `Bearer <api_key>`; else UNAUTHENTICATED.

    `how` says where the key goes, e.g. "the header 'Authorization: Bearer <key>'". The key is never echoed.
    """
    if not api_key:
        return None
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    if not authorization:
        return ServingError(UNAUTHENTICATED, f"missing API key: send {how}")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                             api_key.encode("utf-8")):
        return ServingError(UNAUTHENTICATED, f"invalid API key: send {how} with this server's key")
    return None


class Admission:
    """Generation requests in flight on one ingress replica, over both protocols together; beyond `limit`
    (max_queued_requests) new ones are refused at once instead of queueing."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def try_admit(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> ServingError:
        return ServingError(OVERLOADED, f"this server is at its limit of {self.limit} requests in flight "
                                        "(max_queued_requests); retry later")


def _serving_error_in(exc: BaseException | None, depth: int = 0) -> ServingError | None:
    """The ServingError inside `exc`: itself, or what Ray (`cause`) or Serve (`original_exception`) wrapped."""
    if exc is None or depth > 6:
        return None
    if isinstance(exc, ServingError):
        return exc
    for inner in (getattr(exc, "original_exception", None), getattr(exc, "cause", None), exc.__cause__):
        if isinstance(inner, BaseException) and inner is not exc:
            found = _serving_error_in(inner, depth + 1)
            if found is not None:
                return found
    return None


class QuietClientErrors(logging.Filter):
    """Turns an ERROR-with-traceback record about a client error (Ray Serve logs one for every exception out
    of a streaming gRPC method, also the INVALID_ARGUMENT it carries) into one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info:
            error = _serving_error_in(record.exc_info[1])
            if error is not None and not error.kind.fault:
                record.msg, record.args = "%s %s: %s", (record.getMessage(), error.kind.grpc_code, error.message)
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_client_errors(logger_name: str = "ray.serve") -> None:
    """Installs QuietClientErrors on a logger (Ray Serve's by default) once per process."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, QuietClientErrors) for f in target.filters):
        target.addFilter(QuietClientErrors())
