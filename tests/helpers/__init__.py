"""Helpers shared by the test modules (imported as ``helpers``; tests never import
other test modules or ``conftest``).

* :mod:`helpers.environment` -- AE titles, required tools and files (skip locally,
  fail in CI), bounded waits;
* :mod:`helpers.processes` -- ``dicom-node serve`` as a child process;
* :mod:`helpers.dimse` -- a pynetdicom SCU that stores to an in-process node;
* :mod:`helpers.sr` -- what an SR says: the Finding and the probabilities by concept;
* :mod:`helpers.files` -- facts about DICOM files on disk;
* :mod:`helpers.pki` -- throwaway CAs, keys and certificates for TLS tests.
"""
