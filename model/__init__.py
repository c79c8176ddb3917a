"""The classifier and everything bound to it (network, classes, preprocessing, engine).

This package imports nothing from ``dicom_node`` or ``training`` (see DESIGN.md).
"""
