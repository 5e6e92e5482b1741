"""The Run page's trace id: a Jaeger link when the console knows Jaeger's URL, plain text otherwise."""

from __future__ import annotations

from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc
from console._app import Console
from console._config import ConsoleConfig

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _fragment(run: orc.Run, jaeger_url: str) -> str:
    env = Console(ConsoleConfig()).templates.env
    return env.get_template("_trace.html").render(run=run, jaeger_url=jaeger_url).strip()


def test_trace_id_links_to_jaeger_when_configured():
    """With BULKHEAD_CONSOLE_JAEGER_URL set (trailing slash dropped), the id links to that Jaeger's trace view."""
    config = ConsoleConfig.from_env({"BULKHEAD_CONSOLE_JAEGER_URL": "http://jaeger.local:16686/"})
    assert config.jaeger_url == "http://jaeger.local:16686"
    html = _fragment(orc.Run(trace_id=TRACE), config.jaeger_url)
    assert f'href="http://jaeger.local:16686/trace/{TRACE}"' in html and "<code" not in html


def test_trace_id_is_text_without_jaeger_and_absent_without_trace():
    """No Jaeger URL: the id shows as text, no link; an untraced run shows no trace line at all."""
    assert ConsoleConfig.from_env({}).jaeger_url == ""
    html = _fragment(orc.Run(trace_id=TRACE), "")
    assert f'<code id="trace">{TRACE}</code>' in html and "href" not in html
    assert _fragment(orc.Run(), "http://jaeger.local:16686") == ""
