"""The Ray Serve application: `build_app(args) -> Application` for `serve run`, `serve deploy`, KubeRay
`serveConfigV2` (`import_path: llama4serve.cluster.app:build_app`) and `llama4serve serve`.

Two deployments: `Ingress` (the OpenAI-compatible FastAPI app on the HTTP proxy and the gRPC servicer methods on
the gRPC proxy) and `Engine` (one replica = one model instance with its data-plane actors). The ingress reaches
the engine replicas through a streaming DeploymentHandle.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from llama4serve.cluster.engine.core import resolve_max_model_len
from llama4serve.cluster.serving.engine_deployment import Engine, EngineClient
from llama4serve.cluster.serving.grpc.service import GrpcIngressMixin
from llama4serve.cluster.serving.openai.api import build_fastapi_app
from llama4serve.cluster.serving.policy import Admission, quiet_client_errors
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.actors.model.config import load_model_config


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()  # the FastAPI app is built per replica, in __serve_build_asgi_app__
class Ingress(GrpcIngressMixin):
    """Implements openai_api.ServingContext (HTTP) and grpc_service.GrpcIngressHost (gRPC)."""

    def __init__(self, engine_handle, config: ServeConfig):
        quiet_client_errors()  # Serve logs client errors of streaming gRPC methods in one INFO line
        self._handle = engine_handle
        self.engine = EngineClient(engine_handle, config.request_timeout_s)
        model_dir = config.model_dir()
        self.model_name = config.model_name()
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_model_len = resolve_max_model_len(config.engine_config(), load_model_config(model_dir))
        self.api_key = config.resolved_api_key()
        self.max_queued_requests = config.max_queued_requests
        self.max_request_bytes = config.max_request_bytes
        self.max_n = config.max_n
        self.max_images_per_request = config.max_images_per_request
        self.max_image_bytes = config.max_image_bytes
        self.admission = Admission(config.max_queued_requests)  # one bound for HTTP and gRPC together

    def __serve_build_asgi_app__(self):
        return build_fastapi_app(self)

    # ServingContext
    def generate(self, prompt, params, request_id):
        return self.engine.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        await self._handle.check_health.remote()


def build_app(args: dict | ServeConfig | None = None) -> Application:
    """The application for `args` (ServeConfig fields; unknown fields are an error)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig(**(args or {}))
    # Serve's default of 5 ongoing requests per replica would queue requests in front of our own limits.
    engine = Engine.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_num_seqs * config.attention_actors + config.max_queued_requests,
    ).bind(config)
    return Ingress.options(max_ongoing_requests=config.max_queued_requests + 16).bind(engine, config)
