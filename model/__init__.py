"""The classifier and everything bound to it (network, classes, preprocessing, engine).

The bottom layer: it imports nothing from ``dicom_node`` or ``training``
(an import-linter contract in pyproject.toml; see docs/architecture.md).
"""
