#!/usr/bin/env python3
"""Bicep syntax check without the Bicep CLI: parse every .bicep file with tree-sitter-bicep.

Usage: python3 scripts/check_bicep_syntax.py [DIR...]   (default: infra)

Fails on any ERROR or MISSING node, naming the file, line and column. tree-sitter-bicep 1.1.0
predates the `extension` keyword (Bicep 0.30+), so an `extension <alias>` line is blanked before
parsing (line numbers are kept) after checking that <alias> is declared in bicepconfig.json.
This is syntax only: types, property names and API versions need `bicep build` (online).

It first makes sure the parser rejects a deliberately broken snippet, so a parser that accepts
everything cannot pass the check.
"""

from __future__ import annotations

import json
import os
import re
import sys

import tree_sitter_bicep
from tree_sitter import Language, Parser

EXTENSION_LINE = re.compile(r"^(\s*)extension\s+([A-Za-z_][A-Za-z0-9_]*)\s*$", re.M)
PARSER = Parser(Language(tree_sitter_bicep.language()))


def problems(source: bytes) -> list[str]:
    tree = PARSER.parse(source)
    found = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            line, col = node.start_point
            kind = f"missing {node.type}" if node.is_missing else "syntax error"
            snippet = source.splitlines()[line][col:col + 40].decode(errors="replace") if line < len(source.splitlines()) else ""
            found.append(f"{line + 1}:{col + 1}: {kind} near {snippet!r}")
            if node.is_error:
                continue
        stack.extend(node.children)
    return sorted(found, key=lambda s: tuple(int(x) for x in s.split(":")[:2]))


def declared_extensions(path: str) -> set[str]:
    """Extension aliases in the nearest bicepconfig.json at or above path's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        config = os.path.join(folder, "bicepconfig.json")
        if os.path.exists(config):
            with open(config) as f:
                return set(json.load(f).get("extensions", {}))
        parent = os.path.dirname(folder)
        if parent == folder:
            return set()
        folder = parent


def main(argv: list[str]) -> int:
    dirs = argv[1:] or ["infra"]
    failed = passed = 0

    broken = b"param x string =\nresource r 'A/b@2020-01-01' = {\n  name: 'x'\n"
    if not problems(broken):
        print("FAIL  tree-sitter-bicep accepted a broken file: the check would prove nothing")
        return 1
    if problems(b"param x string = 'a'\nvar y = filter([1, 2], n => n > 1)\noutput z array = y\n"):
        print("FAIL  tree-sitter-bicep rejected a valid file (lambda): the check is unusable")
        return 1

    files = sorted(
        os.path.join(d, f) for top in dirs for d, _, fs in os.walk(top) for f in fs if f.endswith(".bicep")
    )
    if not files:
        print(f"FAIL  no .bicep files under {dirs}")
        return 1
    for path in files:
        with open(path, "rb") as f:
            text = f.read().decode()
        errors = []
        aliases = {m.group(2) for m in EXTENSION_LINE.finditer(text)}
        unknown = aliases - declared_extensions(path)
        if unknown:
            errors.append(f"extension(s) {sorted(unknown)} not declared in bicepconfig.json")
        stripped = EXTENSION_LINE.sub(lambda m: m.group(1), text)
        errors += problems(stripped.encode())
        if errors:
            failed += 1
            print(f"FAIL  {path}")
            for e in errors:
                print(f"        {path}:{e}")
        else:
            passed += 1
            note = f" (extension {', '.join(sorted(aliases))} checked against bicepconfig.json)" if aliases else ""
            print(f"ok    {path}{note}")
    print(f"bicep-syntax: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
