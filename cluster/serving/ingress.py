"""The `Ingress` Serve deployment: the OpenAI-compatible FastAPI app on the HTTP proxy and the gRPC servicer
methods on the gRPC proxy, in front of the `Engine` deployment (reached through a streaming DeploymentHandle).

Runs in a CPU pod: this module imports neither torch nor the engine, nor the checkpoint maker
(`tests/unit/test_serving_imports.py` checks it). Its checkpoint directory must exist where it runs (`build_app`
or the CLI makes a preset's random checkpoint before deploying; the Helm chart's init container in every pod).
"""

from __future__ import annotations

from ray import serve

from llama4serve.actors.model.config import load_model_config
from llama4serve.cluster.config import resolve_max_model_len
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.serving.engine_client import EngineClient
from llama4serve.cluster.serving.grpc.service import GrpcIngressMixin
from llama4serve.cluster.serving.openai.api import build_fastapi_app
from llama4serve.cluster.serving.policy import Admission, quiet_client_errors
from llama4serve.cluster.serving.serve_config import ServeConfig


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()  # the FastAPI app is built per replica, in __serve_build_asgi_app__
class Ingress(GrpcIngressMixin):
    """Implements openai.serving.ServingContext (HTTP) and grpc.service.GrpcIngressHost (gRPC)."""

    def __init__(self, engine_handle, config: ServeConfig):
        quiet_client_errors()  # Serve logs client errors of streaming gRPC methods in one INFO line
        self._handle = engine_handle
        self.engine = EngineClient(engine_handle, config.request_timeout_s)
        config.check_checkpoint()
        model_dir = config.model_dir()
        self.model_name = config.model_name()
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_model_len = resolve_max_model_len(config, load_model_config(model_dir).max_position_embeddings)
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
