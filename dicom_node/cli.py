"""``dicom-node``: one program, thin sub-commands over the packages."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dicom_node import __version__
from dicom_node.config import Settings, load_settings
from dicom_node.db import Job, JobState
from dicom_node.errors import NodeError

LOGGER = logging.getLogger(__name__)

app = typer.Typer(
    help="A DICOM node that classifies chest radiographs and returns a DICOM SR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Inspect the job store.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
model_app = typer.Typer(help="Create, import, install and show classifier models.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file.", exists=True)
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Holds the database and spool by default.")
]
CalledAEOption = Annotated[str, typer.Option("--called-ae", "-aec", help="The peer's AE title.")]
CallingAEOption = Annotated[str, typer.Option("--calling-ae", "-aet", help="Our AE title.")]
TimeoutOption = Annotated[float, typer.Option(help="Network and DIMSE timeout, seconds.")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' chatter, unless debugging: pynetdicom logs every PDU at INFO (never
    # identifiers); highdicom logs each module it copies into an SR, naming the source's
    # SOP Instance UID, at INFO (nine lines per SR); APScheduler warns when a dispatch
    # run is skipped because one is already running, which is expected.
    for name, quiet in (("pynetdicom", logging.WARNING), ("highdicom", logging.WARNING),
                        ("apscheduler", logging.ERROR)):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else quiet)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except (NodeError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    config: ConfigOption = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="Our AE title.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port.")] = None,
    data_dir: DataDirOption = None,
    allow_calling_ae: Annotated[
        list[str] | None,
        typer.Option("--allow-calling-ae", help="Allowed calling AE title (repeatable)."),
    ] = None,
    accept_any_calling_ae: Annotated[
        bool | None,
        typer.Option("--accept-any-calling-ae/--no-accept-any-calling-ae",
                     help="Accept any calling AE title."),
    ] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", exists=True, file_okay=False,
        help="Install and activate this model artifact before serving.")] = None,
    destination: Annotated[list[str] | None, typer.Option(
        "--destination", help="Send every SR to AET@HOST:PORT (repeatable).")] = None,
) -> None:
    """Run the node: receive chest radiographs, classify them, send the SRs back."""
    from dicom_node.node import Node

    settings = _settings(
        config,
        ae_title=ae_title,
        host=host,
        port=port,
        data_dir=data_dir,
        allowed_calling_ae=allow_calling_ae or None,
        accept_any_calling_ae=accept_any_calling_ae,
        destinations=destination or None,
    )
    _setup_logging(settings.log_level)
    if model is not None:
        from model import card

        try:
            card.install(model, settings.models_path)
        except (card.ModelIntegrityError, FileNotFoundError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    if not settings.accept_any_calling_ae and not settings.allowed_calling_ae:
        LOGGER.warning("no calling AE title is allowed: every association will be rejected "
                       "(set allowed_calling_ae or --allow-calling-ae)")
    LOGGER.info("dicom-node %s starting; data in %s", __version__, settings.data_dir)
    Node(settings).run()


@app.command()
def echo(
    host: str,
    port: int,
    called_ae: CalledAEOption = "DICOM_NODE",
    calling_ae: CallingAEOption = "DICOM_NODE_SCU",
    timeout: TimeoutOption = 30.0,
) -> None:
    """Send C-ECHO to a DICOM node (Verification SCU)."""
    from dicom_node import scu

    _setup_logging("WARNING")
    try:
        status = scu.echo(host, port, called_ae, calling_ae, timeout)
    except ConnectionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"C-ECHO status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(
    host: str,
    port: int,
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
    called_ae: CalledAEOption = "DICOM_NODE",
    calling_ae: CallingAEOption = "DICOM_NODE_SCU",
    timeout: TimeoutOption = 30.0,
) -> None:
    """Send DICOM files with C-STORE (Storage SCU); exit 1 if any was not stored."""
    from dicom_node import scu

    _setup_logging("WARNING")
    try:
        results = scu.send(host, port, files, called_ae, calling_ae, timeout)
    except (ConnectionError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for result in results:
        status = "not sent" if result.status is None else f"0x{result.status:04X}"
        detail = f" {result.detail}" if result.detail else ""
        typer.echo(f"{result.path}: {status}{detail}")
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


def _job_dict(job: Job, deliveries: list[Any] | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "state": job.state.value,
        "sop_class_uid": job.sop_class_uid,
        "sop_instance_uid": job.sop_instance_uid,
        "series_instance_uid": job.series_instance_uid,
        "study_instance_uid": job.study_instance_uid,
        "transfer_syntax_uid": job.transfer_syntax_uid,
        "calling_ae": job.calling_ae,
        "attempts": job.attempts,
        "intake_reason": job.intake_reason,
        "spool_file": job.spool_file,
        "sha256": job.sha256,
        "size_bytes": job.size_bytes,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "last_error": job.last_error,
        "label": job.label,
        "probabilities": job.probabilities,
        "model_version": job.model_version,
        "sr_sop_instance_uid": job.sr_sop_instance_uid,
        "sr_series_instance_uid": job.sr_series_instance_uid,
        "deliveries": [
            {"destination": d.destination, "state": d.state.value, "attempts": d.attempts,
             "last_status": d.last_status, "last_error": d.last_error,
             "next_attempt_at": d.next_attempt_at.isoformat(),
             "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None}
            for d in deliveries or []
        ],
    }


def _store(config: Path | None, data_dir: Path | None) -> Any:
    from dicom_node.jobs import JobStore

    settings = _settings(config, data_dir=data_dir)
    return JobStore(settings.db_url, max_attempts=settings.max_attempts)


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    state: Annotated[JobState | None, typer.Option("--state", help="Only this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List jobs, newest first."""
    with _store(config, data_dir) as store:
        jobs = store.list(state=state, limit=limit)
        deliveries = store.deliveries([j.id for j in jobs])
    if as_json:
        typer.echo(json.dumps([_job_dict(j, deliveries[j.id]) for j in jobs], indent=2))
        return
    table = Table("id", "state", "received (UTC)", "calling AE", "attempts", "label",
                  "SR deliveries", "reason")
    for job in jobs:
        sent = ", ".join(f"{d.destination.split('@')[0]}:{d.state.value}"
                         for d in deliveries[job.id])
        table.add_row(str(job.id), job.state.value, job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      job.calling_ae, str(job.attempts), job.label or "", sent,
                      job.last_error or job.intake_reason)
    Console().print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: int,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show every field of one job as JSON."""
    with _store(config, data_dir) as store:
        job = store.get(job_id)
        deliveries = store.deliveries([job_id])[job_id]
    if job is None:
        typer.echo(f"error: no job with id {job_id}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(_job_dict(job, deliveries), indent=2))


@jobs_app.command("retry")
def jobs_retry(
    job_id: int,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Requeue a job's dead SR deliveries (or the job itself, if it failed)."""
    with _store(config, data_dir) as store:
        deliveries = store.retry_dead_deliveries(job_id)
        job = store.requeue_failed_job(job_id)
    if not deliveries and not job:
        typer.echo(f"error: job {job_id} has no dead delivery and did not fail", err=True)
        raise typer.Exit(1)
    typer.echo(f"job {job_id}: {deliveries} delivery(ies) requeued"
               + ("; job requeued" if job else ""))


def _quiet_tensorflow() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@model_app.command("create")
def model_create(
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
    _quiet_tensorflow()
    _setup_logging("WARNING")
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
        "notes": "" if from_file else "UNTRAINED: for tests and demos; outputs mean nothing.",
    }
    try:
        created = card.save_artifact(built, out, fields)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{out}: {created.architecture} {created.input_size}px "
               f"{created.display_version} sha256 {created.sha256[:16]}")


@model_app.command("import")
def model_import(
    h5_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                            help="A whole saved Keras 2 model (.h5/.hdf5).")],
    out: Annotated[Path, typer.Option("--out", help="New artifact directory.")],
    arch: Annotated[str, typer.Option("--arch")] = "concatenated",
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
) -> None:
    """Turn a model file published by the paper's authors into an artifact."""
    _quiet_tensorflow()
    _setup_logging("WARNING")
    import keras

    from model import card

    try:
        loaded = keras.models.load_model(h5_file, compile=False)
    except Exception as exc:
        typer.echo(f"error: {h5_file.name} cannot be loaded: {exc}", err=True)
        raise typer.Exit(2) from exc
    size = int(loaded.input_shape[1])
    created = card.save_artifact(loaded, out, {
        "version": version, "architecture": arch, "input_size": size, "trained": True,
        "training_data": {"weights_imported_from": h5_file.name},
        "notes": "Imported from a Keras 2 HDF5 file; validate before clinical evaluation.",
    })
    typer.echo(f"{out}: imported, {size}px, sha256 {created.sha256[:16]}")


@model_app.command("install")
def model_install(
    artifact: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Verify an artifact, copy it into the node's model directory and activate it."""
    from model import card

    settings = _settings(config, data_dir=data_dir)
    try:
        target = card.install(artifact, settings.models_path)
    except (card.ModelIntegrityError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    installed = card.read_card(target)
    typer.echo(f"installed and active: {installed.name} {installed.display_version} "
               f"({target})")


@model_app.command("show")
def model_show(
    artifact: Annotated[Path | None, typer.Argument(help="An artifact; default: the active one.")
                        ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print the model card (JSON) of an artifact or of the active model."""
    from model import card

    if artifact is None:
        artifact = card.active(_settings(config, data_dir=data_dir).models_path)
        if artifact is None:
            typer.echo("no model installed (dicom-node model install DIR)", err=True)
            raise typer.Exit(1)
    try:
        shown = card.read_card(artifact)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"path": str(artifact), **card.describe(shown)}, indent=2))


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
    model_dir: Annotated[Path | None, typer.Option(
        "--model", help="Artifact directory; default: the node's active model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    backend: Annotated[str | None, typer.Option("--backend", help="Inference backend.")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Classify DICOM or PNG/JPEG chest radiographs; print class and probabilities."""
    _quiet_tensorflow()
    settings = _settings(config, data_dir=data_dir)
    _setup_logging("WARNING")
    from model import card, engine, preprocess
    from model.classes import CLASS_KEYS

    artifact = model_dir or card.active(settings.models_path)
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
    if as_json:
        typer.echo(json.dumps({"model": loaded.card.name,
                               "model_version": loaded.card.display_version,
                               "trained": loaded.card.trained, "results": results}, indent=2))
    else:
        if not loaded.card.trained:
            typer.echo("WARNING: this model is UNTRAINED; its outputs mean nothing.", err=True)
        for row in results:
            if "error" in row:
                typer.echo(f"{row['file']}: error: {row['error']}")
                continue
            probs = "  ".join(f"{k}={v:.4f}" for k, v in row["probabilities"].items())
            typer.echo(f"{row['file']}: {row['label']}  {probs}")
    raise typer.Exit(1 if failures else 0)


@app.command()
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Folder for the split files.")],
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="KIND:PATH, KIND one of covid-chestxray, rsna, folder, csv "
        "(repeatable; the first source's pneumonia images are the paper's 'common' ones).",
    )] = None,
    folds: Annotated[int, typer.Option("--folds")] = 5,
    phases: Annotated[int, typer.Option("--phases")] = 8,
    unique_pneumonia: Annotated[int, typer.Option("--unique-pneumonia")] = 200,
    unique_normal: Annotated[int, typer.Option("--unique-normal")] = 250,
    protocol: Annotated[str, typer.Option(
        "--protocol", help="clean (validation never touches the test set) or paper.")
    ] = "clean",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    check_paper: Annotated[Path | None, typer.Option(
        "--check-paper", exists=True, file_okay=False,
        help="Check the authors' fold*/train*.csv in this folder instead.")] = None,
) -> None:
    """Read datasets and write patient-level folds of phase-balanced training phases."""
    from training import sources as readers
    from training import splits

    if check_paper is not None:
        for fold in sorted(check_paper.glob("fold*")):
            try:
                compositions = splits.check_paper_fold(fold, phases)
            except (ValueError, OSError, KeyError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from exc
            shapes = sorted({(c.covid, c.common_pneumonia, c.unique_pneumonia, c.normal)
                             for c in compositions})
            typer.echo(f"{fold.name}: {len(compositions)} phases, COVID-19/common pneumonia/"
                       f"unique pneumonia/normal = {shapes}")
        return
    kinds = {"covid-chestxray": readers.covid_chestxray, "rsna": readers.rsna,
             "folder": readers.folder_per_class, "csv": readers.csv_list}
    records = []
    for item in source or []:
        kind, _, path = item.partition(":")
        if kind not in kinds or not path:
            typer.echo(f"error: --source {item!r}: expected KIND:PATH with KIND in "
                       f"{sorted(kinds)}", err=True)
            raise typer.Exit(2)
        records += list(kinds[kind](Path(path)))  # type: ignore[operator]
    if not records:
        typer.echo("error: no records (give --source KIND:PATH)", err=True)
        raise typer.Exit(2)
    try:
        made = splits.make_folds(records, folds, phases, unique_pneumonia, unique_normal,
                                 protocol=protocol, seed=seed)  # type: ignore[arg-type]
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    splits.write_folds(out, made)
    for k, made_fold in enumerate(made, start=1):
        typer.echo(f"fold{k}: {len(made_fold.phases)} phases of {len(made_fold.phases[0])} "
                   f"images, validation {len(made_fold.validation)}, test {len(made_fold.test)}")
    typer.echo(f"written to {out}")


def _auto_quota(records: list[Any], label: str, folds: int, phases: int, paper: int) -> int:
    """The paper's per-phase quota, or what a small data set can give every phase."""
    first_source = next((r.source for r in records if r.label == "covid"), None)
    count = sum(1 for r in records if r.label == label
                and not (label == "pneumonia" and r.source == first_source))
    return max(1, min(paper, int(count * (folds - 1) / folds * 0.8) // phases))


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder (splits, logs, model).")],
    data: Annotated[Path | None, typer.Option(
        "--data", exists=True, help="A CSV list or a folder per class.")] = None,
    paper_splits: Annotated[Path | None, typer.Option(
        "--paper-splits", exists=True, file_okay=False,
        help="Train on the authors' own All.csv and fold*/train*.csv instead.")] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", exists=True, file_okay=False,
        help="With --paper-splits: the folder holding all their images.")] = None,
    arch: Annotated[str, typer.Option("--arch")] = "concatenated",
    input_size: Annotated[int, typer.Option("--input-size")] = 300,
    folds: Annotated[int, typer.Option("--folds")] = 5,
    fold: Annotated[int, typer.Option("--fold", help="Which fold to train (1-based).")] = 1,
    phases: Annotated[int, typer.Option("--phases")] = 8,
    epochs_per_phase: Annotated[int, typer.Option("--epochs-per-phase")] = 100,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Default: 20 (concatenated) or 30, as in the paper.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="none, imagenet or FILE.")] = "none",
    unique_pneumonia: Annotated[int | None, typer.Option("--unique-pneumonia")] = None,
    unique_normal: Annotated[int | None, typer.Option("--unique-normal")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="clean or paper.")] = "clean",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
) -> None:
    """Train one fold the paper's way, then evaluate it on the fold's test set."""
    _quiet_tensorflow()
    _setup_logging("INFO")
    from training import evaluate as evaluation
    from training import sources, splits
    from training import train as training

    if (data is None) == (paper_splits is None) or (paper_splits is not None and images is None):
        typer.echo("error: give either --data, or --paper-splits with --images", err=True)
        raise typer.Exit(2)
    if not 1 <= fold <= folds:
        typer.echo(f"error: --fold must be between 1 and {folds}", err=True)
        raise typer.Exit(2)
    per_p = per_n = 0
    try:
        if paper_splits is not None and images is not None:
            protocol = "paper"
            chosen = splits.import_paper_fold(paper_splits, fold, images, phases, seed=seed)
            splits.write_folds(out / "splits", [chosen])
        else:
            assert data is not None
            records = sources.read(data)
            per_p = unique_pneumonia or _auto_quota(records, "pneumonia", folds, phases, 200)
            per_n = unique_normal or _auto_quota(records, "normal", folds, phases, 250)
            made = splits.make_folds(records, folds, phases, per_p, per_n,
                                     protocol=protocol, seed=seed)  # type: ignore[arg-type]
            splits.write_folds(out / "splits", made)
            chosen = made[fold - 1]
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    config = training.TrainConfig(architecture=arch, input_size=input_size,
                                  epochs_per_phase=epochs_per_phase, batch_size=batch_size,
                                  weights=weights, seed=seed, version=version,
                                  extra={"fold": fold, "folds": folds, "protocol": protocol,
                                         "unique_pneumonia": per_p, "unique_normal": per_n})
    created = training.train(chosen.phases, chosen.validation, config, out / f"fold{fold}")
    artifact = out / f"fold{fold}" / "model"
    result = evaluation.evaluate_artifact(artifact, chosen.test, out / f"fold{fold}" /
                                          "evaluation", paper=protocol == "paper")
    evaluation.record_in_card(artifact, result)
    typer.echo(f"model: {artifact} ({created.architecture} {created.input_size}px); "
               f"test accuracy {result['overall_accuracy']:.4f} on {result['images']} images; "
               f"install with: dicom-node model install {artifact}")


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Option("--model", exists=True, file_okay=False)],
    data: Annotated[Path, typer.Option("--data", exists=True,
                                       help="A CSV list or a folder per class.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json and the report.")],
    prevalence: Annotated[list[str] | None, typer.Option(
        "--prevalence", help="CLASS=FRACTION: report the PPV at this prevalence.")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Show the paper's Table 4 row.")
                     ] = False,
) -> None:
    """Evaluate a model on labelled images: the paper's tables, AUC, intervals, plots."""
    _quiet_tensorflow()
    _setup_logging("WARNING")
    from training import evaluate as evaluation
    from training import sources

    given: dict[str, float] = {}
    for item in prevalence or []:
        key, _, value = item.partition("=")
        try:
            given[key.strip()] = float(value)
        except ValueError as exc:
            typer.echo(f"error: --prevalence {item!r} is not CLASS=FRACTION", err=True)
            raise typer.Exit(2) from exc
    result = evaluation.evaluate_artifact(model_dir, sources.read(data), out, paper=paper,
                                          prevalence=given)
    typer.echo(f"overall accuracy {result['overall_accuracy']:.4f} on {result['images']} "
               f"images; report: {out / 'report.md'}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
