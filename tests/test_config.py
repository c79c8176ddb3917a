"""Settings: defaults, TOML file, environment overrides, flags, the example file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.config import Settings, load_settings
from dicom_node.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "node.example.toml"


def test_defaults_are_secure_and_local() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 11112
    assert settings.allowed_calling_ae == []
    assert settings.accept_any_calling_ae is False
    assert settings.storage_dir == Path("var") / "spool"
    assert settings.database_url == "sqlite:///var/dicom-node.db"


def test_toml_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'ae_title = "FROMFILE"\nport = 4000\nallowed_calling_ae = ["PACS1"]\n'
        '[intake]\nnon_chest = "refuse"\n'
    )
    settings = load_settings(config)
    assert (settings.ae_title, settings.port, settings.allowed_calling_ae) == (
        "FROMFILE", 4000, ["PACS1"])
    assert settings.intake.non_chest == "refuse"

    monkeypatch.setenv("DICOM_NODE_PORT", "5000")
    monkeypatch.setenv("DICOM_NODE_INTAKE__UNDETERMINED", "ignore")
    settings = load_settings(config)
    assert settings.port == 5000
    assert settings.intake.undetermined == "ignore"
    assert settings.intake.non_chest == "refuse"

    settings = load_settings(config, port=6000, ae_title=None)
    assert settings.port == 6000
    assert settings.ae_title == "FROMFILE"


def test_data_dir_moves_database_and_spool(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path)
    assert settings.storage_dir == tmp_path / "spool"
    assert settings.database_url == f"sqlite:///{tmp_path / 'dicom-node.db'}"


@pytest.mark.parametrize("title", ["", "A" * 17, "BAD\\AE"])
def test_invalid_ae_title_is_refused_with_field_name(title: str) -> None:
    with pytest.raises(ValidationError, match="ae_title"):
        Settings(ae_title=title)


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("ae_titel = 'TYPO'\n")
    with pytest.raises(ValidationError, match="ae_titel"):
        load_settings(config)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(Path("/nonexistent/node.toml"))


def test_tls_needs_key_and_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="together"):
        Settings(tls_certificate=tmp_path / "cert.pem")


def test_example_file_is_valid_and_documents_every_field() -> None:
    text = EXAMPLE.read_text()
    document = tomllib.loads(text)
    # Every value the example sets is the default: loading it changes nothing.
    assert load_settings(EXAMPLE) == Settings()
    # Every field is there: set (at its default), or as a commented-out example line
    # when it has no fixed default (unset, or derived from data_dir).
    commented = set(re.findall(r"^# (\w+) = ", text, flags=re.MULTILINE))
    for name, field in Settings.model_fields.items():
        if name not in document:
            assert name in commented, f"{name} is not in {EXAMPLE.name}"
            assert field.default is None, f"{name} has a default the example leaves out"
    assert set(document["intake"]) == set(type(Settings().intake).model_fields)


def test_destinations_of_every_kind_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('''
[[destinations]]
address = "PACS@127.0.0.1:104"

[[destinations]]
kind = "dicomweb"
url = "https://pacs.example.org/dicom-web"
objects = ["evidence"]
token_env = "PACS_TOKEN"

[[destinations]]
kind = "hl7"
name = "ris"
address = "ris.example.org:2575"
allow_plaintext = true
receiving_application = "RIS"

[[destinations]]
kind = "fhir"
url = "https://fhir.example.org/r4"
token = "s3cret"
''')
    targets = load_settings(config).destinations
    assert [(t.kind, t.name, t.key) for t in targets] == [
        ("dicom", "PACS@127.0.0.1:104", "PACS@127.0.0.1:104"),
        ("dicomweb", "https://pacs.example.org/dicom-web", "https://pacs.example.org/dicom-web"),
        ("hl7", "ris", "ris.example.org:2575"),
        ("fhir", "https://fhir.example.org/r4", "https://fhir.example.org/r4")]
    assert targets[1].objects == ("evidence",) and targets[2].hl7_endpoint() == (
        "ris.example.org", 2575)
    assert "s3cret" not in repr(targets[3])  # tokens stay out of logs and tracebacks


def test_bearer_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    (target,) = Settings(destinations=[{"kind": "fhir", "url": "http://127.0.0.1:1/fhir",
                                        "token_env": "FHIR_TOKEN"}]).destinations
    assert target.bearer_token() is None
    monkeypatch.setenv("FHIR_TOKEN", "from-env")
    assert target.bearer_token() == "from-env"


@pytest.mark.parametrize("entry", [
    "PACS@127.0.0.1",  # no port
    {"kind": "hl7", "address": "ris.example.org"},
    {"kind": "hl7", "address": "ris:99999"},
    {"kind": "hl7", "address": "ris.example.org:2575"},  # clear text off-host, not allowed
    {"kind": "fhir", "url": "ftp://fhir.example.org/"},
    {"kind": "dicomweb", "url": "http://pacs.example.org/dicom-web"},  # clear text off-host
    {"kind": "smtp", "url": "https://mail.example.org"},
    {"kind": "dicom", "address": "PACS@127.0.0.1:104", "objects": ["pdf"]},
])
def test_a_malformed_destination_is_refused(entry: object) -> None:
    with pytest.raises(ValidationError):
        Settings(destinations=[entry])  # type: ignore[list-item]


def test_a_refused_destination_does_not_echo_its_token() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(destinations=[{"kind": "fhir", "url": "http://ris.example.org/fhir",
                                "token": "SECRET-TOKEN"}])
    assert "plain http" in str(refused.value) and "SECRET-TOKEN" not in str(refused.value)


def test_two_destinations_of_one_name_or_one_address_are_refused() -> None:
    with pytest.raises(ValidationError, match="same name"):
        Settings(destinations=[{"kind": "hl7", "name": "ris", "address": "127.0.0.1:1"},
                               {"kind": "hl7", "name": "ris", "address": "127.0.0.2:2"}])
    # Each delivery names its destination by kind and address: two entries for one
    # place would be one delivery row with two settings.
    with pytest.raises(ValidationError, match="same address"):
        Settings(destinations=[{"kind": "hl7", "name": "a", "address": "localhost:1"},
                               {"kind": "hl7", "name": "b", "address": "localhost:1"}])
