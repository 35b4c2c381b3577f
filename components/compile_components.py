"""Compile every component to ``components/<name>.yaml`` for ``kfp.components.load_component_from_file``.

Run ``python -m apem_kfp.components.compile_components`` after changing a component; the YAMLs are committed
(a test checks they are up to date with the code).
"""

from __future__ import annotations

import argparse
import importlib
import os

from kfp import compiler

from apem_kfp.components import COMPONENT_NAMES

HERE = os.path.dirname(os.path.abspath(__file__))


def component(name: str):
    return getattr(importlib.import_module(f"apem_kfp.components.{name}"), name)


def compile_components(out_dir: str = HERE) -> list[str]:
    paths = []
    for name in COMPONENT_NAMES:
        path = os.path.join(out_dir, f"{name}.yaml")
        compiler.Compiler().compile(component(name), package_path=path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=HERE)
    for path in compile_components(parser.parse_args(argv).out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
