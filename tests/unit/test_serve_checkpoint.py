"""Where the default checkpoint (a random one of `preset`) is made: in `build_app` / the CLI, before anything is
deployed, never in the Ingress or the Engine (which only read `model`)."""

from __future__ import annotations

import pytest

from llama4serve.cluster.cli import generate_cmd
from llama4serve.cluster.serving.app import build_app, with_checkpoint
from llama4serve.cluster.serving.serve_config import ServeConfig


@pytest.fixture
def made(monkeypatch):
    calls = []

    def fake_resolve_model(model, preset, cache_dir):
        calls.append((model, preset, cache_dir))
        return cache_dir / preset

    monkeypatch.setattr(generate_cmd, "resolve_model", fake_resolve_model)
    return calls


def test_with_checkpoint_makes_the_preset_when_model_is_unset(made, tmp_path):
    config = with_checkpoint(ServeConfig(preset="tiny-scout", cache_dir=str(tmp_path)))
    assert made == [(None, "tiny-scout", tmp_path)]
    assert config.model == str(tmp_path / "tiny-scout") and config.model_name() == "tiny-scout"


def test_with_checkpoint_leaves_a_given_model_alone(made, tmp_path):
    config = ServeConfig(model=str(tmp_path / "ckpt"))
    assert with_checkpoint(config) is config and made == []


def test_the_deployments_get_a_config_with_model_set(made, tmp_path):
    app = build_app({"preset": "tiny-scout", "cache_dir": str(tmp_path)})
    ingress = app._bound_deployment
    engine_node, config = ingress.init_args
    assert config.model == str(tmp_path / "tiny-scout")
    assert engine_node._bound_deployment.init_args[0].model == config.model
    assert made == [(None, "tiny-scout", tmp_path)]


def test_model_dir_does_not_make_a_checkpoint():
    with pytest.raises(ValueError, match="model is unset"):
        ServeConfig().model_dir()
    assert ServeConfig(model="/ckpt").model_dir() == "/ckpt"
    assert ServeConfig(model="/m/x").model_name() == "x"


def test_a_replica_without_the_checkpoint_says_how_to_fix_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="init container"):
        ServeConfig(model=str(tmp_path)).check_checkpoint()
    (tmp_path / "config.json").write_text("{}")
    ServeConfig(model=str(tmp_path)).check_checkpoint()
