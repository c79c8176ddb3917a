"""``python -m dicom_node`` is ``dicom-node``."""

from dicom_node.cli import main

main()
