#!/usr/bin/env python3
"""Regenerate the Python stubs under bulkhead/ from protos/ (the one command: `python scripts/gen_protos.py`).

With --out DIR it writes elsewhere, which the staleness test uses to compare against what is committed.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def _include_dirs() -> list[str]:
    import google.rpc  # googleapis-common-protos ships google/rpc/*.proto beside its modules

    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    googleapis = pathlib.Path(next(iter(google.rpc.__path__))).parent.parent
    return [str(PROTOS), str(wkt), str(googleapis)]


def proto_files() -> list[pathlib.Path]:
    """Every .proto file of ours, in a stable order."""
    return sorted(PROTOS.rglob("*.proto"))


def _mypy_grpc_plugin() -> str:
    """mypy-protobuf's protoc plugin, which writes the typed *_pb2_grpc.pyi stubs (grpcio-tools writes none)."""
    beside = pathlib.Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    found = str(beside) if beside.exists() else shutil.which("protoc-gen-mypy_grpc")
    if found is None:
        raise SystemExit("protoc-gen-mypy_grpc not found: pip install mypy-protobuf (part of '.[test]')")
    return found


def generate(out: pathlib.Path) -> None:
    """Compile every proto into out/ (messages, gRPC stubs and .pyi type stubs for both)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = [
        "protoc",
        *(f"-I{d}" for d in _include_dirs()),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={_mypy_grpc_plugin()}",
        f"--mypy_grpc_out=quiet:{out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: fix the proto errors above, then run this again")
    # Generated packages need __init__.py so that setuptools and mypy see them.
    for d in {p.parent for p in out.rglob("*_pb2.py")}:
        while d != out:
            (d / "__init__.py").touch()
            d = d.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
