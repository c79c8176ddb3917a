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
from urllib.parse import urlsplit

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

from dicom_node.destination import Target, check_ae_title
from dicom_node.errors import ConfigError


class IntakeRules(BaseModel):
    """Which received instances are frontal chest radiographs (rules are data, not code).

    An instance is a candidate when its SOP Class is in ``sop_classes`` and its
    Modality in ``modalities``. It is *chest* when Body Part Examined is one of
    ``chest_body_parts`` or an Anatomic Region code is one of
    ``chest_anatomic_codes``; *not chest* when either names something else;
    otherwise a description attribute containing one of ``chest_keywords``
    makes it chest, and with no evidence at all ``undetermined`` decides.

    A chest image is then judged for its view, since the network only knows
    frontal (PA/AP) radiographs. The strongest source that gives evidence
    decides: the first item of View Code Sequence (0054,0220) against
    ``frontal_view_codes``/``non_frontal_view_codes`` (CID 4010 DX View, SCT and
    legacy SRT values), View Position (0018,5101) against
    ``frontal_view_positions``/``non_frontal_view_positions``, a well-formed
    Patient Orientation (0020,0020) (a coronal image plane is frontal, a
    sagittal one lateral, anything between oblique), and last the words of the
    ``description_attributes``, in their order, against ``frontal_view_words``/
    ``non_frontal_view_words`` (an attribute naming both, as a two-view study's
    "CHEST PA AND LAT" does, is no evidence). View Code Sequence and View
    Position that contradict each other make the image non-frontal. A
    non-frontal image is handled by ``non_frontal``; one with no evidence by
    ``undetermined_view``.
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
            "SeriesDescription",
            "ProtocolName",
            "PerformedProcedureStepDescription",
            "RequestedProcedureDescription",
            "StudyDescription",
        ],
        description="Attributes searched for chest_keywords and view words, most specific "
        "first: a study's description speaks for all of its images.",
    )
    non_chest: Literal["ignore", "refuse"] = Field(
        default="ignore",
        description="ignore: acknowledge and record as 'ignored'; refuse: answer 0xC220.",
    )
    undetermined: Literal["accept", "ignore", "refuse"] = Field(
        default="accept",
        description="What to do with a candidate that carries no body-part evidence at all.",
    )
    frontal_view_codes: list[str] = Field(
        default=[
            # SCT postero-anterior, antero-posterior, frontal; then their SRT values as
            # pydicom's SNOMED mapping has them, and the older SRT postero-anterior
            # (R-10214) that modalities still send
            "272479007", "399348003", "399033003",
            "R-40888", "R-10206", "R-10202", "R-10214",
        ],
        description="View Code Sequence code values that mean a frontal view (CID 4010).",
    )
    non_frontal_view_codes: list[str] = Field(
        default=[
            # lateral, medial-lateral, lateral-medial, sagittal (SCT, then SRT)
            "399067008", "399173006", "399198007", "399260004", "399352003", "30730003",
            "R-102CD", "R-10236", "R-10232", "R-10224", "R-10228", "G-A145",
            # the obliques
            "260426006", "260427002", "399004004", "399006002", "399038007", "399059000",
            "399099002", "399132005", "399135007", "399160007", "399182000", "399184004",
            "399225005", "399236003", "399288005", "399312000", "399325008", "399356000",
            "399368009",
            "R-40782", "R-40783", "R-10246", "R-10212", "R-10210", "R-10216", "R-10230",
            "R-10252", "R-10220", "R-10204", "R-102C1", "R-10238", "R-10250", "R-10234",
            "R-10248", "R-10208", "R-10254", "R-40985", "R-10226",
            # every other DX view: axial, tangential, cranio-caudal, specimen, ...
            "119376003", "260499007", "399061009", "399071006", "399110001", "399162004",
            "399196006", "399242004", "399255003", "399272005", "399316002", "399335002",
            "399351005", "399360002",
            "G-8300", "R-40810", "R-10241", "R-102C3", "R-102C2", "R-10242", "R-10244",
            "R-102C6", "R-10256", "R-102C5", "R-102C8", "R-102C4", "R-102C7", "R-10257",
        ],
        description="View Code Sequence code values that mean any other view (CID 4010).",
    )
    frontal_view_positions: list[str] = Field(
        default=["PA", "AP", "POSTERO_ANTERIOR", "ANTERO_POSTERIOR", "POSTEROANTERIOR",
                 "ANTEROPOSTERIOR", "FRONTAL"],
        description="View Position (0018,5101) values that mean frontal (case-insensitive).",
    )
    non_frontal_view_positions: list[str] = Field(
        default=["LL", "RL", "LLD", "RLD", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO", "LAT",
                 "LATERAL", "OBLIQUE", "DECUBITUS"],
        description="View Position values that mean lateral, oblique or decubitus.",
    )
    frontal_view_words: list[str] = Field(
        default=["PA", "AP", "FRONTAL", "POSTEROANTERIOR", "ANTEROPOSTERIOR"],
        description="Whole words of a description attribute that mean frontal "
        "(case-insensitive; words are split at every character that is not a letter or digit).",
    )
    non_frontal_view_words: list[str] = Field(
        default=["LAT", "LATERAL", "LL", "RL", "LLD", "RLD", "LLO", "RLO", "LAO", "RAO", "LPO",
                 "RPO", "OBL", "OBLIQUE", "DECUB", "DECUBITUS"],
        description="Whole words of a description attribute that mean another view.",
    )
    non_frontal: Literal["ignore", "refuse"] = Field(
        default="ignore",
        description="A chest image that is not frontal (or whose view attributes conflict): "
        "ignore: acknowledge and record as 'ignored'; refuse: answer 0xC220.",
    )
    undetermined_view: Literal["accept", "ignore", "refuse"] = Field(
        default="accept",
        description="What to do with a chest image that carries no view evidence at all.",
    )

    @model_validator(mode="after")
    def _views_are_one_or_the_other(self) -> IntakeRules:
        for kind in ("view_codes", "view_positions", "view_words"):
            frontal = getattr(self, f"frontal_{kind}")
            other = getattr(self, f"non_frontal_{kind}")
            both = {t.upper().strip() for t in frontal} & {t.upper().strip() for t in other}
            if both:
                raise ValueError(f"frontal_{kind} and non_frontal_{kind} both hold "
                                 f"{', '.join(sorted(both))}")
        return self


class Settings(BaseSettings):
    """Every setting of the node; see deploy/node.example.toml for a commented file."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        # A refused value is not echoed: it may be a bearer token.
        hide_input_in_errors=True,
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
    retention_files_days: int = Field(
        default=0, ge=0, description="Delete a job's files (the received image, its SR and "
        "evidence image) and a study result's message files this many days after it "
        "finished, once each of its deliveries is final: done, or dead and left so (no "
        "`dicom-node jobs retry`) for as many days. 0: keep them for ever.")
    retention_rows_days: int = Field(
        default=0, ge=0, description="Delete the rows of jobs and study results (with their "
        "deliveries), whose files are gone, this many days after they finished: the audit "
        "of what was sent where. At least retention_files_days; 0: keep them for ever.")

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
    inference_backend: Literal["keras-fp32", "keras-bf16", "keras-fp16", "openvino-fp32",
                               "openvino-bf16", "openvino-int8"] = Field(
        default="keras-fp32", description="Inference backend (see model/engine.py); an int8 "
        "model is served by openvino-int8 whatever this says.")
    inference_device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="auto: a GPU when the backend sees one (keras-* "
        "backends; keras-fp16 or keras-bf16 are the fast ones there), else the CPU."
    )
    inference_xla: Literal["auto", "on", "off"] = Field(
        default="auto", description="Compile the keras-* forward pass with XLA; auto: on a "
        "GPU only (on a CPU it measured 3.5x slower).")
    inference_threads: int = Field(default=0, ge=0, description="CPU threads (0: all cores).")
    batch_size: int = Field(
        default=0, ge=0, description="Largest inference batch (0: 4 on a CPU; on a GPU the "
        "largest power of two up to 128 whose activations fit half its free memory)."
    )

    max_batch_delay_ms: int = Field(
        default=50, ge=0, description="How long the worker waits to fill a batch."
    )

    int8_min_top1_agreement: float = Field(
        default=0.99, ge=0.0, le=1.0,
        description="model install refuses an int8 model whose top-1 agreement with its "
        "fp32 source (on its card) is lower, unless --force.")
    int8_max_probability_difference: float = Field(
        default=0.02, ge=0.0, le=1.0,
        description="... or whose largest probability difference from it is higher.")

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

    # --- results and their delivery ---
    evidence_image: bool = Field(
        default=True, description="Make an evidence image (a class-activation map with a "
        "legend, as a Secondary Capture in the source study) beside each SR.",
    )
    evidence_max_size: int = Field(
        default=1024, ge=0, description="The evidence image's longer side at most, in "
        "pixels (0, or at least 512): a larger source is shown reduced, its shorter side "
        "kept at 512 at least so that the legend fits (0: always at the source's own size).",
    )
    destinations: list[Target] = Field(
        default=[], description="Where results go: 'AET@HOST:PORT' strings (DICOM C-STORE) "
        "or tables with a kind: dicom, dicomweb (STOW-RS), hl7 (ORU^R01 over MLLP), fhir.",
    )
    return_to_calling_ae: bool = Field(
        default=False,
        description="Also send the SR and the evidence image back to the AE that sent the image.",
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
    dispatch_min_gap_seconds: float = Field(
        default=0.5, ge=0, description="New results are sent at once, or, within this long "
        "of the last dispatch's start, when it has passed: while the worker has work, the "
        "results of several batches go over one association; when it has none, at once."
    )

    # --- job queue ---
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job fails.")
    lease_seconds: float = Field(default=300.0, gt=0, description=(
        "Worker lease on a job; the worker renews it every third of this while it runs."))

    # --- operations ---
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of /metrics, /healthz and /readyz (keep "
        "it on loopback or a management network: it answers anyone who reaches it).")
    metrics_port: int = Field(
        default=9112, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz "
        "(0: no status endpoint).")
    ready_destination_failing_seconds: float = Field(
        default=900.0, gt=0, description="/readyz fails while a destination has had a "
        "delivery failing (still pending, not yet delivered) for longer than this.")

    # --- audit trail ---
    audit_dir: Path = Field(
        default=None,  # type: ignore[assignment]
        description="The audit trail (DICOM PS3.15 A.5 events as JSON lines, no patient "
        "names or IDs); default data_dir/audit.")
    audit_max_mb: int = Field(default=50, ge=1, description="Rotate an audit file at this "
                              "size, MB.")
    audit_backups: int = Field(default=20, ge=1, description="Rotated audit files kept.")
    audit_syslog: str | None = Field(
        default=None, description="Also send every audit message to this syslog collector "
        "(RFC 5424): udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT.")
    audit_syslog_ca: Path | None = Field(
        default=None, description="PEM CA bundle of a tls:// collector's certificate.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, values: list[Target]) -> list[Target]:
        names = [t.name for t in values]
        if len(set(names)) != len(names):
            raise ValueError("destinations: two entries have the same name")
        places = [(t.kind, t.key) for t in values]
        if len(set(places)) != len(places):
            raise ValueError("destinations: two entries of one kind have the same address "
                             "or URL")
        return values

    @field_validator("evidence_max_size")
    @classmethod
    def _evidence_max_size(cls, value: int) -> int:
        if 0 < value < 512:
            raise ValueError("evidence_max_size: 0 (the source's own size) or at least 512 "
                             "(the legend must fit)")
        return value

    @field_validator("delivery_calling_ae")
    @classmethod
    def _delivery_ae(cls, value: str) -> str:
        return check_ae_title(value, "delivery_calling_ae")

    @field_validator("allowed_calling_ae")
    @classmethod
    def _calling(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v, "allowed_calling_ae") for v in values]

    @model_validator(mode="after")
    def _retention_ages(self) -> Settings:
        rows, files = self.retention_rows_days, self.retention_files_days
        if rows and (not files or rows < files):
            raise ValueError(f"retention_rows_days ({rows}) must be 0 (keep) or at least "
                             f"retention_files_days ({files}, not 0): rows outlive files")
        return self

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
                    "audit_dir": data_dir / "audit",
                    "database_url": f"sqlite:///{data_dir / 'dicom-node.db'}"}
        return {**values, **{k: v for k, v in defaults.items() if values.get(k) is None}}

    @field_validator("audit_syslog")
    @classmethod
    def _audit_syslog(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("udp", "tcp", "tls") or not parts.hostname or not port:
            raise ValueError(f"audit_syslog {value!r} is not udp://, tcp:// or "
                             "tls://HOST:PORT")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if self.audit_syslog and self.audit_syslog.startswith("tls:") \
                and self.audit_syslog_ca is None:
            raise ValueError("audit_syslog over tls needs audit_syslog_ca")
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
