"""The public import path of the Serve application, `llama4serve.cluster.app:build_app` (the Helm chart,
KubeRay `serveConfigV2` and users' Serve configs name it); the application lives in `cluster/serving/app.py`."""

from llama4serve.cluster.serving.app import build_app

__all__ = ["build_app"]
