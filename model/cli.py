"""The model's commands: ``model create/import/install/show`` and ``predict``.

:func:`register` adds them to the ``dicom-node`` program (entry point group
``dicom_node.commands``). The node lends its settings -- where models are
installed, the inference backend -- as the :class:`Host` on the command
context, so this package imports nothing from ``dicom_node``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

if TYPE_CHECKING:
    from model.card import ModelCard, OperatingPoint, ParityBounds, TestEvidence
    from model.engine import Backend, Device

# The options that find the node's settings; here, in the bottom layer, so that every
# package's commands spell them the same way.
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file.", exists=True)
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Holds the database and spool by default.")
]


class NodeSettings(Protocol):
    """The node settings the model's commands read."""

    @property
    def model_dir(self) -> Path: ...
    @property
    def inference_backend(self) -> Backend: ...
    @property
    def inference_device(self) -> Device: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def inference_threads(self) -> int: ...
    @property
    def allow_unvalidated_models(self) -> bool: ...
    @property
    def int8_min_top1_agreement(self) -> float: ...
    @property
    def int8_max_probability_difference(self) -> float: ...


class Host(Protocol):
    """What the program lends its commands (``ctx.obj``)."""

    def settings(self, config: Path | None, data_dir: Path | None) -> NodeSettings: ...
    def setup_logging(self, level: str) -> None: ...
    def audit_model_install(self, settings: NodeSettings, model: tuple[str, str, str],
                            validated: bool | None, refusal: str | None) -> None: ...


def _host(ctx: typer.Context) -> Host:
    host: Host = ctx.obj
    return host


model_app = typer.Typer(help="Create, import, install and show classifier models.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``model ...`` and ``predict`` to ``app``."""
    app.add_typer(model_app, name="model")
    app.command()(predict)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter out of a command's output."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@model_app.command("create")
def model_create(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="New artifact directory.")],
    arch: Annotated[str, typer.Option("--arch", help="concatenated, xception or resnet50v2.")
                    ] = "concatenated",
    input_size: Annotated[int, typer.Option("--input-size")] = 300,
    weights: Annotated[str, typer.Option(
        "--weights", help="none (untrained), imagenet (backbones, from the Keras cache) "
        "or a weights file of the whole network (.weights.h5 or the authors' Keras 2 .h5).",
    )] = "none",
    version: Annotated[str, typer.Option("--version")] = "0.1.0",
) -> None:
    """Build one of the paper's networks and save it as an artifact with its model card."""
    quiet_tensorflow()
    _host(ctx).setup_logging("WARNING")
    from model import card, network

    try:
        built = network.build(arch, input_size, weights)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    from_file = weights not in ("none", "imagenet")
    fields: dict[str, Any] = {
        "version": version, "architecture": arch, "input_size": input_size,
        "trained": from_file,
        "training_data": ({"weights_imported_from": Path(weights).name} if from_file else
                          {"backbones": "ImageNet" if weights == "imagenet" else "random"}),
        "training": card.TrainingRecord(starting_weights=card.starting_weights(weights),
                                        input_size=input_size),
        "notes": "" if from_file else "UNTRAINED: for tests and demos; outputs mean nothing.",
    }
    try:
        created = card.save_artifact(built, out, fields)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{out}: {created.architecture} {created.input_size}px "
               f"{created.display_version} sha256 {created.sha256[:16]}")


METRICS_HELP = """\
JSON test evidence of the model on a declared data set, in the shape of the card's
'test': {"data_set": "NAME (origin)", "images": N, "sources": [...],
"balanced_accuracy": X, "balanced_accuracy_95": [LOW, HIGH], "overall_accuracy": X,
"per_class": {"covid": {"sensitivity": X, "sensitivity_95": [LOW, HIGH], "specificity":
X, ...}, ...}, "operating_points": {"covid": {"threshold": T, "target_sensitivity": S,
"validation_images": N, "validation_sensitivity": X, ...}, ...}} (operating_points
optional). Needs --signed-by. Without "images" the card keeps the metrics but stays
unvalidated."""


@model_app.command("import")
def model_import(
    ctx: typer.Context,
    h5_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                            help="A whole saved Keras 2 model (.h5/.hdf5).")],
    out: Annotated[Path, typer.Option("--out", help="New artifact directory.")],
    arch: Annotated[str, typer.Option("--arch")] = "concatenated",
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    metrics: Annotated[Path | None, typer.Option(
        "--metrics", exists=True, dir_okay=False, help=METRICS_HELP)] = None,
    signed_by: Annotated[str | None, typer.Option(
        "--signed-by", help="The person who supplies --metrics and vouches for them.")] = None,
) -> None:
    """Turn a model file published by the paper's authors into an artifact.

    With --metrics FILE --signed-by NAME, the card also carries that test evidence
    (evaluated_by "import", signed by NAME): JSON with data_set, images,
    balanced_accuracy_95 (\\[low, high]), per_class ({class: {sensitivity,
    sensitivity_95, specificity, specificity_95, roc_auc, roc_auc_95}}) and optional
    operating_points ({class: {threshold, target_sensitivity, validation_images, ...}}).
    The model is validated only when that evidence earns it; the command prints
    whether it does.
    """
    quiet_tensorflow()
    _host(ctx).setup_logging("WARNING")
    from model import card

    evidence = _imported_evidence(metrics, signed_by)
    import keras

    try:
        loaded = keras.models.load_model(h5_file, compile=False)
    except Exception as exc:
        typer.echo(f"error: {h5_file.name} cannot be loaded: {exc}", err=True)
        raise typer.Exit(2) from exc
    size = int(loaded.input_shape[1])
    test, points = evidence if evidence is not None else (None, {})
    created = card.save_artifact(loaded, out, {
        "version": version, "architecture": arch, "input_size": size, "trained": True,
        "training_data": {"weights_imported_from": h5_file.name},
        "training": card.TrainingRecord(starting_weights=card.starting_weights(str(h5_file)),
                                        input_size=size),
        "test": test, "operating_points": points,
        "notes": "Imported from a Keras 2 HDF5 file; validate before clinical evaluation.",
    })
    typer.echo(f"{out}: imported, {size}px, sha256 {created.sha256[:16]}")
    _echo_validation(created)


def _imported_evidence(metrics: Path | None, signed_by: str | None
                       ) -> tuple[TestEvidence, dict[str, OperatingPoint]] | None:
    """The test evidence and operating points of ``--metrics``; exit 2 when they cannot be
    read or nobody signs them."""
    from pydantic import ValidationError

    from model import card
    from model.classes import CLASS_KEYS

    if metrics is None:
        if signed_by is not None:
            typer.echo("error: --signed-by signs --metrics; give both", err=True)
            raise typer.Exit(2)
        return None
    if not (signed_by or "").strip():
        typer.echo("error: --metrics needs --signed-by NAME: the person who vouches for them",
                   err=True)
        raise typer.Exit(2)
    try:
        given = json.loads(metrics.read_text())
        if not isinstance(given, dict):
            raise ValueError("expected a JSON object")
        raw_points = given.pop("operating_points", None) or {}
        unknown = sorted(set(raw_points) | set(given.get("per_class") or {}))
        unknown = [key for key in unknown if key not in CLASS_KEYS]
        if unknown:
            raise ValueError(f"unknown class {unknown}; classes are {list(CLASS_KEYS)}")
        test = card.TestEvidence.model_validate(
            {**given, "evaluated_by": "import", "signed_by": signed_by})
        points = {key: card.OperatingPoint.model_validate(value)
                  for key, value in raw_points.items()}
    except (OSError, ValueError, ValidationError) as exc:
        typer.echo(f"error: --metrics {metrics.name}: {exc}", err=True)
        raise typer.Exit(2) from exc
    return test, points


def _echo_validation(shown: ModelCard) -> None:
    """One line: validated or not, and why; the warning line when not."""
    from model import card

    status = card.validation_status(shown)
    typer.echo(str(status))
    if not status.validated:
        typer.echo(f"WARNING: {card.UNVALIDATED_WARNING}", err=True)


@model_app.command("install")
def model_install(
    ctx: typer.Context,
    artifact: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    allow_unvalidated: Annotated[bool, typer.Option(
        "--allow-unvalidated", help="Install a model whose card does not earn 'validated' "
        "(demos, tests); its results then say UNVALIDATED MODEL - NOT FOR CLINICAL USE. "
        "The setting allow_unvalidated_models allows it too.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Install an int8 model whose recorded parity with its fp32 source "
        "misses the settings int8_min_top1_agreement / int8_max_probability_difference. "
        "Below the defaults (0.99, 0.02) it is not validated either.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Verify an artifact, copy it into the node's model directory and activate it.

    A model that is not validated (test evidence on its card, see 'model show') is
    refused unless --allow-unvalidated or the setting allow_unvalidated_models. An
    int8 model out of its parity bounds is refused unless --force.
    """
    from model import card

    host = _host(ctx)
    settings = host.settings(config, data_dir)
    try:
        target = card.install(artifact, settings.model_dir, allow_unvalidated=(
            allow_unvalidated or settings.allow_unvalidated_models),
            parity=parity_bounds(settings), force_parity=force)
    except (card.ModelIntegrityError, card.UnvalidatedModelError, card.ParityError,
            FileNotFoundError, ValueError) as exc:
        # In the audit trail as a refused Software Configuration, named by its folder.
        host.audit_model_install(settings, (artifact.name, "", ""), None, str(exc))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    installed = card.read_card(target)
    host.audit_model_install(
        settings, (installed.name, installed.display_version, installed.sha256),
        card.validation_status(installed).validated, None)
    typer.echo(f"installed and active: {installed.name} {installed.display_version} "
               f"({target})")
    _echo_validation(installed)


#: Below this mean top probability (chance is 1/3) the fp32 model barely tells the
#: validation images apart, and any two numerical paths agree on it.
NEAR_CHANCE = 0.5


def parity_bounds(settings: NodeSettings) -> ParityBounds:
    """The int8 parity bounds the settings configure."""
    from model import card

    return card.ParityBounds(settings.int8_min_top1_agreement,
                             settings.int8_max_probability_difference)


@model_app.command("quantize")
def model_quantize(
    ctx: typer.Context,
    artifact: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                             help="The fp32 artifact to quantize.")],
    calibration: Annotated[Path, typer.Option(
        "--calibration", exists=True, file_okay=False,
        help="Images (DICOM, PNG, JPEG) whose activations set the int8 ranges: a few "
        "hundred from your own PACS.")],
    validation: Annotated[Path, typer.Option(
        "--validation", exists=True, file_okay=False,
        help="Images on which the int8 model is compared with the fp32 one (other images "
        "than the calibration ones); a labels.csv (filename,label) there adds per-class "
        "sensitivity and specificity.")],
    out: Annotated[Path, typer.Option("--out", help="New artifact directory.")],
    labels: Annotated[Path | None, typer.Option(
        "--labels", exists=True, dir_okay=False,
        help="CSV filename,label of the validation images (default: DIR/labels.csv).")] = None,
    version: Annotated[str | None, typer.Option(
        "--version", help="Default: the source's version with -int8.")] = None,
    preset: Annotated[str, typer.Option(
        "--preset", help="mixed (symmetric weights, asymmetric activations: the more "
        "accurate) or performance.")] = "mixed",
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make a validated int8 model (NNCF post-training quantisation for OpenVINO).

    Prints its parity with the fp32 model on the validation images (top-1 agreement,
    largest probability difference, per-class sensitivity and specificity with
    labels), which its card records, and whether 'model install' will take it.
    """
    quiet_tensorflow()
    host = _host(ctx)
    settings = host.settings(config, data_dir)
    host.setup_logging("WARNING")
    if preset not in ("mixed", "performance"):
        typer.echo("error: --preset is mixed or performance", err=True)
        raise typer.Exit(2)
    from model import card, quantize

    try:
        made = quantize.quantize(artifact, calibration, validation, out, labels=labels,
                                 version=version, preset=preset,  # type: ignore[arg-type]
                                 threads=settings.inference_threads)
    except (quantize.QuantizeError, card.ModelIntegrityError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    record = made.quantization
    assert record is not None, "quantize always records it"
    typer.echo(f"{out}: int8 {made.display_version}, {record.calibration_images} "
               f"calibration images, {record.validation_images} validation images "
               f"({record.overlap_images} also used for calibration)")
    typer.echo(f"parity with fp32: top-1 agreement {record.top1_agreement:.4f}, largest "
               f"probability difference {record.max_probability_difference:.4f}, fp32 mean "
               f"top probability {record.mean_top_probability:.3f}")
    if record.mean_top_probability < NEAR_CHANCE:
        typer.echo(f"WARNING: the fp32 model's outputs are near chance on these images (mean "
                   f"top probability {record.mean_top_probability:.3f}): parity on them "
                   "proves little", err=True)
    for key, figures in record.per_class.items():
        shown = ", ".join(f"{name} {value:.3f}" if isinstance(value, float) else
                          f"{name} {value}" for name, value in figures.items())
        typer.echo(f"  {key}: {shown}")
    missed = parity_bounds(settings).failures(record)
    if missed:
        typer.echo(f"model install will refuse it without --force: {'; '.join(missed)}")
    else:
        typer.echo("within the configured parity bounds")
    _echo_validation(made)


@model_app.command("show")
def model_show(
    ctx: typer.Context,
    artifact: Annotated[Path | None, typer.Argument(help="An artifact; default: the active one.")
                        ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print the model card (JSON) of an artifact or of the active model."""
    from model import card

    if artifact is None:
        artifact = card.active(_host(ctx).settings(config, data_dir).model_dir)
        if artifact is None:
            typer.echo("no model installed (dicom-node model install DIR)", err=True)
            raise typer.Exit(1)
    try:
        shown = card.read_card(artifact)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    status = card.validation_status(shown)  # computed from the evidence, never stored
    typer.echo(json.dumps({"path": str(artifact), "validated": status.validated,
                           "validation_reason": status.reason, **card.describe(shown)},
                          indent=2))


def predict(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
    model_dir: Annotated[Path | None, typer.Option(
        "--model", help="Artifact directory; default: the node's active model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    backend: Annotated[str | None, typer.Option("--backend", help="Inference backend.")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Classify DICOM or PNG/JPEG chest radiographs; print class and probabilities."""
    quiet_tensorflow()
    settings = _host(ctx).settings(config, data_dir)
    _host(ctx).setup_logging("WARNING")
    from model import card, engine, preprocess
    from model.classes import CLASS_KEYS

    artifact = model_dir or card.active(settings.model_dir)
    if artifact is None:
        typer.echo("error: no model given and none installed", err=True)
        raise typer.Exit(2)
    try:
        loaded = engine.Engine(artifact, backend=backend or settings.inference_backend,  # type: ignore[arg-type]
                               device=settings.inference_device,
                               batch_size=min(settings.batch_size, max(len(files), 1)),
                               threads=settings.inference_threads)
    except (card.ModelIntegrityError, FileNotFoundError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    inputs, readable = [], []
    failures: dict[str, str] = {}
    for path in files:
        try:
            inputs.append(preprocess.load(path, loaded.input_size,
                                          loaded.card.interpolation))  # type: ignore[arg-type]
            readable.append(path)
        except preprocess.PreprocessError as exc:
            failures[str(path)] = str(exc)
    import numpy as np

    probabilities = loaded.predict(np.stack(inputs)) if inputs else np.zeros((0, 3))
    results: list[dict[str, Any]] = [{"file": str(p), "label": CLASS_KEYS[int(np.argmax(row))],
                "probabilities": {k: round(float(v), 6) for k, v in zip(CLASS_KEYS, row,
                                                                         strict=True)}}
               for p, row in zip(readable, probabilities, strict=True)]
    results += [{"file": f, "error": why} for f, why in failures.items()]
    status = card.validation_status(loaded.card)
    if as_json:
        warning = {} if status.validated else {"warning": card.UNVALIDATED_WARNING}
        typer.echo(json.dumps({"model": loaded.card.name,
                               "model_version": loaded.card.display_version,
                               "trained": loaded.card.trained, "validated": status.validated,
                               "validation": status.reason, **warning, "results": results},
                              indent=2))
    else:
        if not loaded.card.trained:
            typer.echo("WARNING: this model is UNTRAINED; its outputs mean nothing.", err=True)
        if not status.validated:
            typer.echo(f"WARNING: {card.UNVALIDATED_WARNING} ({status.reason})", err=True)
        for row in results:
            if "error" in row:
                typer.echo(f"{row['file']}: error: {row['error']}")
                continue
            probs = "  ".join(f"{k}={v:.4f}" for k, v in row["probabilities"].items())
            marked = "" if status.validated else f"  ({card.UNVALIDATED_WARNING})"
            typer.echo(f"{row['file']}: {row['label']}  {probs}{marked}")
    raise typer.Exit(1 if failures else 0)
