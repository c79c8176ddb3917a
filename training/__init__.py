"""Offline retraining and re-validation of the classifier the paper's way.

May import ``model``; never ``dicom_node``, and the node never imports it (an
import-linter contract in pyproject.toml; see docs/architecture.md). Needs the
``training`` extra.
"""
