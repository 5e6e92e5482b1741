"""Which transport carries unary calls: the official SDK unless a deployment opts into the direct pool."""

import pytest

from services.inference.config import InferenceConfig
from services.inference.providers import AnthropicProvider, Target, make_provider
from tests.services.inference.test_upstream_http import no_proxy_env  # noqa: F401 (fixture)

ENV = {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}


def _upstream(provider: AnthropicProvider):
    return provider._upstream(Target(api_key="sk-test"))


def test_the_sdk_is_the_default_unary_path(no_proxy_env):  # noqa: F811 - the imported fixture
    config = InferenceConfig.from_env(ENV)
    assert config.upstream_transport == "sdk"
    assert _upstream(make_provider(config)).pool is None


def test_direct_is_opt_in(no_proxy_env):  # noqa: F811 - the imported fixture
    config = InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "direct"})
    assert _upstream(make_provider(config)).pool is not None


def test_an_unknown_transport_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="sdk, sdk-httpx or direct"):
        InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "curl"})


def test_sdk_httpx_keeps_the_sdk_on_its_httpx_stack(no_proxy_env):  # noqa: F811
    import anthropic
    import httpx2

    default = _upstream(make_provider(InferenceConfig.from_env(ENV))).http
    assert isinstance(default, anthropic.DefaultAioHttpClient)
    config = InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "sdk-httpx"})
    entry = _upstream(make_provider(config))
    assert entry.pool is None
    assert isinstance(entry.http, httpx2.AsyncClient) and not isinstance(entry.http, anthropic.DefaultAioHttpClient)
