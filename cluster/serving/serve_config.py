"""The serving configuration: one pydantic model read from `build_app(args)`, a YAML file or CLI flags.

Flat on purpose, so that a Helm values file, a KubeRay `serveConfigV2` `args:` block and `llama4serve serve`
flags all spell a field the same way.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import yaml
from pydantic import Field, SecretStr

from llama4serve.cluster.config import EngineConfig, EngineOptions

API_KEY_ENV = "LLAMA4SERVE_API_KEY"
DEFAULT_CACHE_DIR = str(Path.home() / ".cache" / "llama4serve")


class ServeConfig(EngineOptions):
    """A served model: where its checkpoint is, how each instance runs, and the ingress limits."""

    model: str | None = Field(
        None, description="Checkpoint directory; when unset, build_app (or the CLI) makes a random checkpoint of "
                          "`preset` in `cache_dir` on the node it runs on."
    )
    preset: str = Field("tiny-maverick", description="Preset of the random checkpoint made when `model` is unset.")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, description="Where random preset checkpoints are written once.")
    served_model_name: str | None = Field(
        None, description="Model name clients send and /v1/models lists; default: the checkpoint directory's name."
    )
    num_replicas: int = Field(1, ge=1, le=64, description="Independent model instances (Engine replicas).")
    api_key: SecretStr | None = Field(
        None, description=f"Bearer token clients must send; default: the {API_KEY_ENV} environment variable."
    )
    max_queued_requests: int = Field(
        256, ge=1, description="Requests in flight per ingress replica; beyond it new ones get 429 at once."
    )
    max_request_bytes: int = Field(
        32 << 20, ge=1024,
        description="Largest accepted HTTP request body (413 beyond); images arrive in it base64-encoded.",
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (completions per request) accepted.")
    stream_interval: int = Field(
        1, ge=1, le=64,
        description="Streamed tokens per message (SSE event, gRPC message) of a request: its first and last go at "
        "once, the others in groups of this many (vLLM's --stream-interval). Fewer, larger messages cost the "
        "Ingress, the proxy and the client less CPU per token; tokens arrive in bursts of this many.",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="A request still running after this is aborted.")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy (CLI only).")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port of the Serve proxy (CLI only).")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ServeConfig":
        """Fields from a YAML mapping, then `overrides` (e.g. CLI flags that were given) on top."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of ServeConfig fields, got {type(data).__name__}")
        return cls(**{**data, **overrides})

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value() or None
        return os.environ.get(API_KEY_ENV) or None

    def model_dir(self) -> str:
        """The checkpoint directory. `model` must be set: `build_app` (`serving.app.with_checkpoint`) and the
        CLI make the preset's random checkpoint and set it before anything is deployed, so that the Ingress and
        the Engine never import the checkpoint maker."""
        if not self.model:
            raise ValueError("ServeConfig.model is unset: deploy through build_app (or `llama4serve serve`), which "
                             "makes the preset's random checkpoint, or set `model` to a checkpoint directory")
        return self.model

    def check_checkpoint(self) -> None:
        """Raises FileNotFoundError, saying how to fix it, unless this node has the checkpoint (in a replica)."""
        path = Path(self.model_dir())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no checkpoint at {path} on this node ({socket.gethostname()}): build_app makes a preset's random "
                "checkpoint only on the node where it runs; on several nodes, make it in every pod first "
                "(`llama4serve checkpoint --preset P --out DIR`, as the Helm chart's init container does) or put it "
                "on a shared volume, and set `model: DIR`")

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir()).name

    def engine_config(self) -> EngineConfig:
        options = self.model_dump(include=set(EngineOptions.model_fields))
        return EngineConfig(model=self.model_dir(), **options)
