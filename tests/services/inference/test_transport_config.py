"""Which transport carries unary calls: the official SDK unless a deployment opts into the direct pool."""

import pytest

from services.inference.config import InferenceConfig
from services.inference.providers import AnthropicProvider, Target, make_provider
from tests.services.inference.test_upstream_http import no_proxy_env  # noqa: F401 (fixture)

ENV = {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}


def _upstream(provider: AnthropicProvider):
    return provider._upstream(Target(api_key="sk-test"))


def test_the_sdk_is_the_default_unary_path_carried_on_the_pool(no_proxy_env):  # noqa: F811 - the imported fixture
    from services.inference.sdk_http import PoolTransport

    config = InferenceConfig.from_env(ENV)
    assert config.upstream_transport == "sdk"
    provider = make_provider(config)
    entry = _upstream(provider)
    assert entry.pool is not None and entry.head == b""  # no request of the proxy's own making
    sdk = provider._pooled_client(Target(api_key="sk-test"), entry)
    assert isinstance(sdk._client._transport, PoolTransport) and sdk._client._transport.pool is entry.pool


def test_sdk_aiohttp_keeps_unary_calls_on_the_sdks_aiohttp_transport(no_proxy_env):  # noqa: F811
    import anthropic

    config = InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "sdk-aiohttp"})
    entry = _upstream(make_provider(config))
    assert entry.pool is None and isinstance(entry.http, anthropic.DefaultAioHttpClient)


def test_direct_is_opt_in(no_proxy_env):  # noqa: F811 - the imported fixture
    config = InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "direct"})
    assert _upstream(make_provider(config)).pool is not None


def test_an_unknown_transport_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="sdk, sdk-aiohttp, sdk-httpx or direct"):
        InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "curl"})


def test_sdk_httpx_keeps_the_sdk_on_its_httpx_stack(no_proxy_env):  # noqa: F811
    import anthropic
    import httpx2

    default = make_provider(InferenceConfig.from_env(ENV))
    assert isinstance(default._client(Target(api_key="sk-test")), anthropic.AsyncAnthropic)
    assert isinstance(_upstream(default).http, anthropic.DefaultAioHttpClient)  # streams and token counts
    config = InferenceConfig.from_env({**ENV, "BULKHEAD_INFERENCE_UPSTREAM_TRANSPORT": "sdk-httpx"})
    entry = _upstream(make_provider(config))
    assert entry.pool is None
    assert isinstance(entry.http, httpx2.AsyncClient) and not isinstance(entry.http, anthropic.DefaultAioHttpClient)
