"""dicom-node: receive chest radiographs, classify them, return a DICOM SR."""

__version__ = "0.1.0"
