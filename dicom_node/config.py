"""The node's one typed settings object.

Values come, highest priority first, from: keyword arguments (the CLI flags of
``dicom-node serve``), ``DICOM_NODE_*`` environment variables (nested fields with
``__``, e.g. ``DICOM_NODE_INTAKE__NON_CHEST=refuse``), the TOML file given with
``--config``, and the defaults below. ``deploy/node.example.toml`` documents
every field with its default.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from dicom_node.destination import Destination, check_ae_title
from dicom_node.errors import ConfigError


class IntakeRules(BaseModel):
    """Which received instances are chest radiographs (rules are data, not code).

    An instance is a candidate when its SOP Class is in ``sop_classes`` and its
    Modality in ``modalities``. It is *chest* when Body Part Examined is one of
    ``chest_body_parts`` or an Anatomic Region code is one of
    ``chest_anatomic_codes``; *not chest* when either names something else;
    otherwise a description attribute containing one of ``chest_keywords``
    makes it chest, and with no evidence at all ``undetermined`` decides.
    """

    sop_classes: list[str] = Field(
        default=[
            ComputedRadiographyImageStorage,
            DigitalXRayImageStorageForPresentation,
            DigitalXRayImageStorageForProcessing,
            SecondaryCaptureImageStorage,
        ],
        description="SOP Class UIDs that can hold a chest radiograph.",
    )
    modalities: list[str] = Field(
        default=["CR", "DX"], description="Accepted values of Modality (0008,0060)."
    )
    chest_body_parts: list[str] = Field(
        default=["CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_PA", "CHEST_AP", "TORAX"],
        description="Body Part Examined (0018,0015) values that mean chest (case-insensitive).",
    )
    chest_anatomic_codes: list[str] = Field(
        default=["51185008", "43799004", "39607008", "T-D3000", "T-D3400", "T-28000"],
        description="Anatomic Region Sequence code values for thorax/chest/lung (SCT, SRT).",
    )
    chest_keywords: list[str] = Field(
        default=["CHEST", "THORAX", "THORAC", "CXR", "LUNG", "PULMO", "TORAX", "TORACE", "POUMON"],
        description="Words that mark a description attribute as chest (case-insensitive).",
    )
    description_attributes: list[str] = Field(
        default=[
            "StudyDescription",
            "SeriesDescription",
            "ProtocolName",
            "RequestedProcedureDescription",
            "PerformedProcedureStepDescription",
        ],
        description="Attributes searched for chest_keywords.",
    )
    non_chest: Literal["ignore", "refuse"] = Field(
        default="ignore",
        description="ignore: acknowledge and record as 'ignored'; refuse: answer 0xC220.",
    )
    undetermined: Literal["accept", "ignore", "refuse"] = Field(
        default="accept",
        description="What to do with a candidate that carries no body-part evidence at all.",
    )


class Settings(BaseSettings):
    """Every setting of the node; see deploy/node.example.toml for a commented file."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # --- network ---
    ae_title: str = Field(default="DICOM_NODE", description="Our AE title (called AE).")
    host: str = Field(default="127.0.0.1", description="Address the SCP binds to.")
    port: int = Field(default=11112, ge=1, le=65535, description="TCP port of the SCP.")
    allowed_calling_ae: list[str] = Field(
        default=[],
        description="Calling AE titles allowed to associate. Empty (and accept_any_calling_ae "
        "false): the node refuses to start, since nobody could send to it.",
    )
    accept_any_calling_ae: bool = Field(
        default=False, description="Accept any calling AE title (opens the allow-list)."
    )
    allowed_peer_hosts: list[str] = Field(
        default=[], description="If not empty, only these peer IP addresses may connect."
    )
    max_associations: int = Field(default=10, ge=1, description="Concurrent associations.")
    max_pdu_size: int = Field(
        default=131072, ge=0, description="Maximum PDU size we receive (0: unlimited)."
    )
    acse_timeout: float = Field(default=30.0, gt=0, description="ACSE timeout, seconds.")
    dimse_timeout: float = Field(default=30.0, gt=0, description="DIMSE timeout, seconds.")
    network_timeout: float = Field(default=60.0, gt=0, description="Idle network timeout, s.")
    tls_certificate: Path | None = Field(default=None, description="PEM server certificate.")
    tls_private_key: Path | None = Field(default=None, description="PEM private key.")
    tls_ca_certificates: Path | None = Field(
        default=None, description="PEM CA bundle; when set, client certificates are required."
    )

    # --- storage ---
    data_dir: Path = Field(default=Path("var"), description="Holds the spool and the database.")
    # The three below default to places under data_dir (see _derive_paths); after
    # validation each is always set.
    storage_dir: Path = Field(default=None, description="Spool; default data_dir/spool.")  # type: ignore[assignment]
    database_url: str = Field(
        default=None,  # type: ignore[assignment]
        description="SQLAlchemy URL; default sqlite:///<data_dir>/dicom-node.db.",
    )
    min_free_disk_mb: int = Field(
        default=512, ge=0, description="Refuse with 0xA700 when less is free after the write."
    )

    # --- intake ---
    max_pixels: int = Field(
        default=60_000_000,
        ge=1,
        description="Pixel budget: Rows x Columns x frames x samples per instance.",
    )
    intake: IntakeRules = Field(default_factory=IntakeRules)

    # --- model and inference ---
    model_dir: Path = Field(
        default=None,  # type: ignore[assignment]
        description="Installed models and the 'active' link; default data_dir/models.",
    )
    inference_backend: Literal["keras-fp32", "keras-bf16", "openvino-fp32", "openvino-bf16"] = (
        Field(default="keras-fp32", description="Inference backend (see model/engine.py).")
    )
    inference_device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="auto: a GPU when the backend sees one, else the CPU."
    )
    inference_threads: int = Field(default=0, ge=0, description="CPU threads (0: all cores).")
    batch_size: int = Field(
        default=0, ge=0, description="Largest inference batch (0: 4 on a CPU, 32 on a GPU)."
    )

    max_batch_delay_ms: int = Field(
        default=50, ge=0, description="How long the worker waits to fill a batch."
    )

    allow_unvalidated_models: bool = Field(
        default=False,
        description="Serve a model whose card does not earn 'validated' (demos, tests). Every "
        "result then says UNVALIDATED MODEL - NOT FOR CLINICAL USE in its title and text.",
    )

    # --- study results ---
    study_quiet_seconds: float = Field(
        default=30.0, ge=0, description="A study's result is formed this long after its last "
        "frontal image arrived (and once its queued images are classified).",
    )

    # --- delivery of the SR ---
    destinations: list[str] = Field(
        default=[], description="Where every SR is sent: 'AET@HOST:PORT' entries."
    )
    return_to_calling_ae: bool = Field(
        default=False, description="Also send the SR back to the AE that sent the image."
    )
    calling_ae_ports: dict[str, int] = Field(
        default={}, description="Port of each calling AE's Storage SCP, for the return trip."
    )
    delivery_calling_ae: str = Field(default="DICOM_NODE", description="Our AE title as SCU.")
    delivery_timeout: float = Field(
        default=30.0, gt=0, description="ACSE, DIMSE and network timeout when sending, s."
    )
    delivery_max_attempts: int = Field(default=10, ge=1, description="Attempts before 'dead'.")
    retry_base_seconds: float = Field(default=10.0, gt=0, description="First retry delay.")
    retry_multiplier: float = Field(default=2.0, ge=1, description="Backoff factor.")
    retry_max_seconds: float = Field(default=600.0, gt=0, description="Longest retry delay.")
    retry_on_warning: bool = Field(
        default=False, description="Retry when the destination answers with a warning."
    )
    dispatch_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often due deliveries are looked for."
    )

    # --- job queue ---
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job fails.")
    lease_seconds: float = Field(default=300.0, gt=0, description="Worker lease on a job.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, values: list[str]) -> list[str]:
        return [str(Destination.parse(v)) for v in values]

    @field_validator("delivery_calling_ae")
    @classmethod
    def _delivery_ae(cls, value: str) -> str:
        return check_ae_title(value, "delivery_calling_ae")

    @field_validator("allowed_calling_ae")
    @classmethod
    def _calling(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v, "allowed_calling_ae") for v in values]

    @model_validator(mode="before")
    @classmethod
    def _derive_paths(cls, values: Any) -> Any:
        """Default the spool, the model directory and the database under data_dir."""
        if not isinstance(values, dict):
            return values
        data_dir = values.get("data_dir")
        if data_dir is None:
            data_dir = cls.model_fields["data_dir"].default
        if not isinstance(data_dir, str | PathLike):
            return values  # the field's own validation reports it
        data_dir = Path(data_dir)
        defaults = {"storage_dir": data_dir / "spool", "model_dir": data_dir / "models",
                    "database_url": f"sqlite:///{data_dir / 'dicom-node.db'}"}
        return {**values, **{k: v for k, v in defaults.items() if values.get(k) is None}}

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key must be given together")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Read settings from ``config_file`` (TOML), the environment and ``overrides``.

    ``overrides`` whose value is ``None`` are dropped, so unset CLI flags do not
    mask the file or the environment.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    if config_file is None:
        return Settings(**given)  # type: ignore[arg-type]

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    loaded = _FileSettings(**given)  # type: ignore[arg-type]
    return Settings.model_validate(loaded.model_dump())
