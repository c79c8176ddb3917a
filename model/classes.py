"""The three classes, in the one order used by training, inference and the SR.

The order is the authors' (Rahimzadeh & Attar 2020): Keras'
``flow_from_dataframe`` indexed their labels alphabetically -- ``COVID-19``,
``normal``, ``pneumonia`` -- so their published weights emit probabilities in
this order, and ours do too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiagnosisClass:
    """One output of the network and its coded meaning (SNOMED CT)."""

    key: str
    display_name: str
    snomed_code: str
    snomed_meaning: str
    aliases: tuple[str, ...]


CLASSES: tuple[DiagnosisClass, ...] = (
    DiagnosisClass("covid", "COVID-19", "840539006", "Disease caused by SARS-CoV-2",
                   ("covid", "covid-19", "covid19", "sars-cov-2")),
    DiagnosisClass("normal", "Normal", "17621005", "Normal",
                   ("normal", "no finding", "no_finding", "no findings")),
    DiagnosisClass("pneumonia", "Pneumonia", "233604007", "Pneumonia",
                   ("pneumonia",)),
)

#: Class keys in network output order.
CLASS_KEYS: tuple[str, ...] = tuple(c.key for c in CLASSES)
NUM_CLASSES = len(CLASSES)

_BY_ALIAS = {alias: c for c in CLASSES for alias in (c.key, *c.aliases)}


def index_of(label: str) -> int:
    """Output index of a label, accepting the usual spellings ("COVID-19", "Normal", ...)."""
    try:
        return CLASS_KEYS.index(_BY_ALIAS[label.strip().lower()].key)
    except KeyError:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASS_KEYS}") from None


def by_key(key: str) -> DiagnosisClass:
    """The class with this key."""
    return CLASSES[CLASS_KEYS.index(key)]
