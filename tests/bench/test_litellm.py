"""The LiteLLM peer's set-up: where its throwaway virtualenv lives and the config it is started with."""

from __future__ import annotations

import json
import pathlib

from bench import _litellm


def test_venv_lives_in_the_users_cache_never_the_project(tmp_path):
    """The virtualenv goes under XDG_CACHE_HOME (else ~/.cache), so it is never a project dependency."""
    assert _litellm.venv_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "bulkhead-bench" / "litellm-venv"
    assert _litellm.venv_dir({}) == pathlib.Path.home() / ".cache" / "bulkhead-bench" / "litellm-venv"


def test_config_points_one_anthropic_model_at_the_fake_upstream():
    """One deployment: the alias the load asks for -> anthropic/<model> at the given api_base, no retries."""
    config = json.loads(_litellm.config_yaml("http://127.0.0.1:9999", "claude-x-1", "sk-up", "sk-master"))
    assert config["model_list"] == [
        {
            "model_name": _litellm.MODEL_ALIAS,
            "litellm_params": {
                "model": "anthropic/claude-x-1",
                "api_base": "http://127.0.0.1:9999",
                "api_key": "sk-up",
            },
        }
    ]
    assert config["general_settings"] == {"master_key": "sk-master"}
    assert config["litellm_settings"]["num_retries"] == 0
