"""A pynetdicom SCU for the in-process node (anything with ``settings.port``, such as
``dicom_node.node.Node``)."""

from __future__ import annotations

import ssl
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from helpers.environment import CALLING_AE, NODE_AE


def scu(calling: str = CALLING_AE) -> AE:
    """An SCU AE with 10 s timeouts."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.connection_timeout = 10
    return ae


def associate(port: int, datasets: list[Dataset], calling: str = CALLING_AE,
              tls: ssl.SSLContext | None = None, source_host: str = "127.0.0.1",
              **kwargs: Any) -> Association:
    """An association to 127.0.0.1:``port`` proposing each data set's SOP Class in its
    own transfer syntax (and Verification), from ``source_host`` (any 127.x address)."""
    ae = scu(calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE,
                        tls_args=(tls, "127.0.0.1") if tls else None,
                        bind_address=(source_host, 0), **kwargs)


def store_responses(node: Any, datasets: list[Dataset], calling: str = CALLING_AE,
                    tls: ssl.SSLContext | None = None) -> list[Dataset]:
    """C-STORE each data set in its own transfer syntax on one association; return the
    response status data sets (Status, and Error Comment when there is one)."""
    assoc = associate(node.settings.port, datasets, calling, tls)
    assert assoc.is_established, "association rejected"
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def store(node: Any, datasets: list[Dataset], calling: str = CALLING_AE,
          tls: ssl.SSLContext | None = None) -> list[int]:
    """C-STORE each data set in its own transfer syntax; return the statuses."""
    return [int(rsp.Status) for rsp in store_responses(node, datasets, calling, tls)]
