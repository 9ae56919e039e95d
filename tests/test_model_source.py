"""The MODEL argument: paths, the default-model alias, and the errors that name what is wrong."""

from __future__ import annotations

import shutil

import pytest

from swarm.errors import ConfigError
from swarm.model_id import model_dht_prefix, validate_dht_prefix
from swarm.model_source import resolve_model
from tests.conftest import save_tiny_model


def test_a_checkpoint_directory_is_used_as_is(tiny_models):
    assert resolve_model(str(tiny_models["llama"])) == tiny_models["llama"].resolve()


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("/nonexistent/model", "does not exist"),
        ("mistral-9000", "unknown model 'mistral-9000': not a directory and not an alias"),
    ],
)
def test_bad_model_arguments_name_the_problem(argument, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model(argument)


def test_directories_without_config_or_weights(tmp_path):
    with pytest.raises(ConfigError, match="no readable config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        resolve_model(str(tmp_path))


def test_prefix_depends_on_the_model_not_its_directory(tiny_models, tmp_path):
    original = model_dht_prefix(tiny_models["llama"])
    copy = tmp_path / "renamed-copy"
    shutil.copytree(tiny_models["llama"], copy)
    assert model_dht_prefix(copy) == original
    assert model_dht_prefix(save_tiny_model("llama", tmp_path / "other-seed", seed=1)) != original
    assert model_dht_prefix(tiny_models["qwen3"]) != original
    assert original.startswith("llama-6x64-")


def test_dht_prefix_override_is_validated():
    assert validate_dht_prefix("my-model_v2") == "my-model_v2"
    for bad in ("", "has.dot", "has space", "x" * 200):
        with pytest.raises(ConfigError, match="--dht-prefix"):
            validate_dht_prefix(bad)
