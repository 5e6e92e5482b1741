"""Configuration: production refuses to run without encryption from the credentials service."""

from __future__ import annotations

import pytest

from services.state.config import ConfigError, StateConfig


def test_development_defaults_to_local_encryption(tmp_path):
    """Without BULKHEAD_ENV the service encrypts with a local master key in the data dir."""
    config = StateConfig.from_env({"BULKHEAD_DATA_DIR": str(tmp_path)})
    assert not config.production and config.encryption == "local"
    assert config.master_key_path == tmp_path.resolve() / "state-master.key"


def test_production_defaults_to_credentials_encryption():
    """In production the data keys come from the credentials service."""
    config = StateConfig.from_env({"BULKHEAD_ENV": "production"})
    assert config.encryption == "credentials"
    assert config.credentials_addr == "127.0.0.1:50052"


@pytest.mark.parametrize("mode", ["off", "local", "OFF"])
def test_production_refuses_weaker_encryption(mode: str):
    """BULKHEAD_ENV=production with encryption off (or a local key file) does not start."""
    with pytest.raises(ConfigError, match="production"):
        StateConfig.from_env({"BULKHEAD_ENV": "production", "BULKHEAD_STATE_ENCRYPTION": mode})


def test_off_is_allowed_only_outside_production():
    """Development may turn encryption off explicitly (the bench baseline)."""
    assert StateConfig.from_env({"BULKHEAD_STATE_ENCRYPTION": "off"}).encryption == "off"


@pytest.mark.parametrize(
    "env",
    [
        {"BULKHEAD_STATE_ENCRYPTION": "rot13"},
        {"BULKHEAD_STATE_MAX_EVENT_BYTES": "0"},
        {"BULKHEAD_STATE_MAX_EVENTS_PER_APPEND": "many"},
        {"BULKHEAD_STATE_KEY_CACHE_SECONDS": "-1"},
    ],
)
def test_bad_values_are_refused(env):
    """Unknown modes and non-positive limits are configuration errors."""
    with pytest.raises(ConfigError):
        StateConfig.from_env(env)


def test_limits_come_from_the_environment():
    """The size limits are configurable."""
    config = StateConfig.from_env(
        {"BULKHEAD_STATE_MAX_EVENT_BYTES": "100", "BULKHEAD_STATE_MAX_EVENTS_PER_APPEND": "7"}
    )
    assert (config.limits.max_event_bytes, config.limits.max_events_per_append) == (100, 7)
