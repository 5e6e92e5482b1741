"""The proxy imports the anthropic SDK lazily (services/inference/sdk_import.py): every public name of the
SDK still resolves to what the eager import binds, far fewer modules load, and an __init__ the loader cannot
stand in for runs as usual."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.inference import sdk_import

ROOT = Path(__file__).resolve().parents[3]

# Prints {"names": {name: what it is}, "modules": modules loaded} for the anthropic package, imported
# eagerly (as `import anthropic` does) or through sdk_import; then builds what the proxy builds.
SURFACE = """
import json, sys
before = set(sys.modules)
if sys.argv[1] == "lazy":
    from services.inference.sdk_import import anthropic_sdk
    sdk = anthropic_sdk()
else:
    import anthropic as sdk
client = sdk.AsyncAnthropic(api_key="sk-test", http_client=sdk.DefaultAioHttpClient())
client.messages, client.messages.count_tokens
from anthropic._models import FinalRequestOptions
modules = len(set(sys.modules) - before)
names = {}
for name in (json.loads(sys.argv[2]) if len(sys.argv) > 2 else dir(sdk)):
    if name.startswith("__") or "[" in name:  # pydantic's parametrized aliases a star import drags along
        continue
    value = getattr(sdk, name, "<missing>")
    if type(value).__name__ != "module":
        names[name] = f"{type(value).__name__} {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
print(json.dumps({"names": names, "modules": modules}))
"""


def _surface(mode: str, names: list[str] | None = None) -> dict:
    args = [sys.executable, "-c", SURFACE, mode] + ([json.dumps(names)] if names is not None else [])
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


def test_every_public_name_of_the_sdk_resolves_as_the_eager_import_binds_it_with_far_fewer_modules():
    eager = _surface("eager")
    lazy = _surface("lazy", sorted(eager["names"]))
    assert len(eager["names"]) > 100
    differ = {
        name: (kind, lazy["names"].get(name))
        for name, kind in eager["names"].items()
        if lazy["names"].get(name) != kind
    }
    assert differ == {}
    # Counted after the client and its messages resource are built: what the proxy loads.
    assert lazy["modules"] * 2 < eager["modules"], (lazy["modules"], eager["modules"])


@pytest.fixture
def lazy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, dict[str, str]], None]]:
    """Writes a fixture package on a sys.path entry of its own, with a lazy finder for it; every module
    imported from there, and the finders, are gone afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    finders: list[sdk_import.LazyPackageFinder] = []

    def make(root: str, files: dict[str, str]) -> None:
        for name, text in files.items():
            path = tmp_path / root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        finders.append(sdk_import.LazyPackageFinder(root))
        sys.meta_path.insert(0, finders[-1])

    yield make
    for finder in finders:
        sys.meta_path.remove(finder)
    for name in [name for name in sys.modules if name.startswith(("lazyfixture", "eagerfixture"))]:
        del sys.modules[name]


FIXTURE = {
    "__init__.py": """
        import sys as _sys
        from . import light
        from .heavy import Heavy as Heavy
        from ._setup import setup as _setup
        from .stars import *
        from .nested import inner as inner_module

        __all__ = ["Heavy", "light", "STAR"]
        _setup()
        for __name in __all__:
            try:
                globals()[__name].__module__ = __name__
            except AttributeError:
                pass
    """,
    "light.py": "VALUE = 1\n",
    "heavy.py": "class Heavy:\n    pass\n",
    "stars.py": "STAR = object()\n_HIDDEN = 1\n",
    "_setup.py": "import sys\n\ndef setup():\n    sys.modules[__name__].ran = True\n",
    "sub/__init__.py": "from .deep import DEEP as DEEP\n",
    "sub/deep.py": "DEEP = 'deep'\n",
    "nested/__init__.py": "def helper():\n    pass\n",  # not plannable: a package run as usual
    "nested/inner.py": "INNER = 'inner'\n",
}


def test_a_lazy_package_loads_a_submodule_when_one_of_its_names_is_first_used(lazy_package):
    lazy_package("lazyfixture", FIXTURE)
    import lazyfixture

    assert "lazyfixture.heavy" not in sys.modules
    assert "lazyfixture.stars" not in sys.modules
    assert sys.modules["lazyfixture._setup"].ran  # plain statements still run, their names resolved first
    assert "Heavy" in dir(lazyfixture)

    heavy = lazyfixture.Heavy
    assert heavy is sys.modules["lazyfixture.heavy"].Heavy
    assert heavy.__module__ == "lazyfixture"  # the __all__ loop, done as the name resolves
    assert lazyfixture.STAR is sys.modules["lazyfixture.stars"].STAR  # a star import's name, read statically
    assert lazyfixture.light.VALUE == 1
    assert lazyfixture.sub.DEEP == "deep"  # a submodule nobody imported, as an attribute
    assert lazyfixture.inner_module.INNER == "inner"  # `from .nested import inner`: a submodule, imported
    assert "lazyfixture.sub.deep" in sys.modules
    with pytest.raises(AttributeError, match="no attribute '_HIDDEN'"):
        lazyfixture._HIDDEN  # noqa: B018  # a star import skips private names, and so does the lazy package
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lazyfixture.nothing  # noqa: B018


def test_an_init_the_loader_cannot_stand_in_for_runs_as_usual(lazy_package):
    files = dict(FIXTURE)
    files["__init__.py"] = files["__init__.py"] + "\n        def helper():\n            return Heavy\n"
    lazy_package("eagerfixture", files)
    import eagerfixture

    assert "eagerfixture.heavy" in sys.modules  # a def among the statements: the package's own __init__ ran
    assert eagerfixture.helper() is eagerfixture.Heavy


def test_a_name_bound_lazily_and_by_a_statement_runs_the_init_as_usual(lazy_package):
    files = dict(FIXTURE)
    # Eagerly the later binding wins; lazily the statement's would win whatever the order, so it is not planned.
    files["__init__.py"] = files["__init__.py"] + "\n        light = 'rebound'\n"
    lazy_package("eagerfixture", files)
    import eagerfixture

    assert eagerfixture.light == "rebound"
    assert "eagerfixture.heavy" in sys.modules


def test_a_package_whose_lazy_set_up_fails_is_imported_by_its_own_init(lazy_package):
    files = dict(FIXTURE)
    # A name the plan cannot find at set-up (the star target binds it only when run): lazily, the plain
    # statement fails; the package's own __init__ then runs and succeeds.
    files["__init__.py"] = files["__init__.py"] + "\n        _late = dynamic\n"
    files["stars.py"] = "STAR = object()\nexec('dynamic = 1')\n"
    lazy_package("eagerfixture", files)
    import eagerfixture

    assert eagerfixture._late == 1
    assert "eagerfixture.heavy" in sys.modules
