"""The house rule on docstrings: a public function that takes more than three
arguments documents them (numpydoc ``Parameters``). Commands are exempt: their
docstrings are their ``--help`` text and their options carry their own help."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Overrides whose signature belongs to a library (pydantic-settings' source hook).
_LIBRARY_HOOKS = {"settings_customise_sources"}


def _undocumented() -> list[str]:
    found = []
    for package in ("dicom_node", "model", "training"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name == "cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (not isinstance(node, ast.FunctionDef) or node.name.startswith("_")
                        or node.name in _LIBRARY_HOOKS):
                    continue
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                if names[:1] in (["self"], ["cls"]):
                    names = names[1:]
                if len(names) > 3 and "Parameters\n" not in (ast.get_docstring(node) or ""):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return found


def test_public_functions_of_more_than_three_arguments_document_them() -> None:
    assert _undocumented() == []
