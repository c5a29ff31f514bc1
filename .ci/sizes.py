"""The size rule of the code base: no file over 400 lines and no function over 60 in sae/, callbacks/, train.py
and evaluate.py. Prints each offender (path, lines, name) and exits 1 if there is one.

    python .ci/sizes.py [--exclude PATH ...]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACES = ("sae", "callbacks", "train.py", "evaluate.py")
MAX_FILE, MAX_FUNCTION = 400, 60


def offenders(exclude: set[str]) -> list[tuple[str, int, str]]:
    files = [p for place in PLACES for p in ([ROOT / place] if place.endswith(".py") else (ROOT / place).rglob("*.py"))]
    found = []
    for path in sorted(files):
        name = path.relative_to(ROOT).as_posix()
        if name in exclude:
            continue
        source = path.read_text()
        if (lines := len(source.splitlines())) > MAX_FILE:
            found.append((name, lines, "(file)"))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    found.append((name, length, f"{node.name}()"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exclude", nargs="*", default=[], help="files (relative paths) to leave out")
    found = offenders(set(parser.parse_args().exclude))
    for name, lines, what in found:
        print(f"{name}: {what} {lines} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
