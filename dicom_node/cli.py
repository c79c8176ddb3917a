"""``dicom-node``: one program composed of the commands each package owns.

This module holds the node's commands (``serve``, ``echo``, ``send``, ``jobs``,
``db``, ``version``). The model's and training's commands are registered through the
entry point group ``dicom_node.commands`` (see ``pyproject.toml``): each names a
``register(app)`` function, and their commands find the node's settings and
logging as the :class:`Host` on the command context, so ``dicom_node`` never
imports ``training`` and ``model`` never imports ``dicom_node``.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table

from dicom_node import __version__, audit
from dicom_node.config import Settings, load_settings
from dicom_node.db import Delivery, Job, JobState
from dicom_node.errors import ConfigError, NodeError
from dicom_node.jobs import JobStore
from dicom_node.libraries import configure
from model.card import UNVALIDATED_WARNING
from model.cli import ConfigOption, DataDirOption

LOGGER = logging.getLogger(__name__)

app = typer.Typer(
    help="A DICOM node that classifies chest radiographs and returns a DICOM SR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Inspect the job store.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
studies_app = typer.Typer(help="Study results: one answer per study.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")
db_app = typer.Typer(help="The job store's schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

#: Entry point group of the packages' ``register(app)`` functions.
COMMANDS_GROUP = "dicom_node.commands"

CalledAEOption = Annotated[str, typer.Option("--called-ae", "-aec", help="The peer's AE title.")]
CallingAEOption = Annotated[str, typer.Option("--calling-ae", "-aet", help="Our AE title.")]
TimeoutOption = Annotated[float, typer.Option(help="Network and DIMSE timeout, seconds.")]


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; the libraries' chatter stays quiet unless DEBUG."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' chatter, unless debugging: pynetdicom logs every PDU at INFO (never
    # identifiers); highdicom logs each module it copies into an SR, naming the source's
    # SOP Instance UID, at INFO (nine lines per SR); APScheduler warns when a dispatch
    # run is skipped because one is already running, which is expected; dicomweb-client
    # logs each request's URL (study UIDs) at INFO; urllib3 each connection; alembic
    # its plugins and context (dicom_node.db logs the upgrade itself).
    for name, quiet in (("pynetdicom", logging.WARNING), ("highdicom", logging.WARNING),
                        ("apscheduler", logging.ERROR), ("dicomweb_client", logging.WARNING),
                        ("urllib3", logging.WARNING), ("alembic", logging.WARNING)):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else quiet)


AllowUnvalidatedOption = Annotated[bool | None, typer.Option(
    "--allow-unvalidated-models/--no-allow-unvalidated-models",
    help="Serve a model whose card is not validated (demos, tests); every result then "
    "says UNVALIDATED MODEL - NOT FOR CLINICAL USE.")]


MetricsPortOption = Annotated[int | None, typer.Option(
    "--metrics-port", help="Port of /metrics, /healthz and /readyz (default 9112; 0: off; "
    "a worker beside a node on one machine needs another).")]


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
    allow_unvalidated_models: AllowUnvalidatedOption = None,
    metrics_port: MetricsPortOption = None,
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
        allow_unvalidated_models=allow_unvalidated_models,
        metrics_port=metrics_port,
    )
    setup_logging(settings.log_level)
    try:
        node = Node(settings)
    except ConfigError as exc:  # e.g. no calling AE title allowed: nobody could send
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if model is not None:
        from model import card
        from model.cli import parity_bounds

        try:
            target = card.install(model, settings.model_dir,
                                  allow_unvalidated=settings.allow_unvalidated_models,
                                  parity=parity_bounds(settings))
        except (card.ModelIntegrityError, card.UnvalidatedModelError, card.ParityError,
                FileNotFoundError, ValueError) as exc:
            _audit_model(settings, (model.name, "", ""), None, str(exc))
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        installed = card.read_card(target)
        _audit_model(settings, (installed.name, installed.display_version, installed.sha256),
                     card.validation_status(installed).validated, None)
    LOGGER.info("dicom-node %s starting; data in %s", __version__, settings.data_dir)
    _run(node)


def _run(node: Any) -> None:
    """Run ``node`` until stopped; exit 2 with the reason when it refuses to start (an
    active model that may not serve)."""
    try:
        node.run()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def worker(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    allow_unvalidated_models: AllowUnvalidatedOption = None,
    metrics_port: MetricsPortOption = None,
) -> None:
    """Classify and deliver only: one more worker on the node's job store and spool."""
    from dicom_node.node import Node

    settings = _settings(config, data_dir=data_dir,
                         allow_unvalidated_models=allow_unvalidated_models,
                         metrics_port=metrics_port)
    setup_logging(settings.log_level)
    LOGGER.info("dicom-node %s worker starting; data in %s", __version__, settings.data_dir)
    _run(Node(settings, receive=False))


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

    setup_logging("WARNING")
    configure()
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

    setup_logging("WARNING")
    configure()
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


def _job_dict(job: Job, deliveries: list[Delivery]) -> dict[str, Any]:
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
        "view": job.view,
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
        "model_validated": job.model_validated,
        **({"warning": UNVALIDATED_WARNING} if job.model_validated is False else {}),
        "flags": job.flags,
        "study_note": job.study_note,
        "sr_sop_instance_uid": job.sr_sop_instance_uid,
        "sr_series_instance_uid": job.sr_series_instance_uid,
        "evidence_sop_instance_uid": job.evidence_sop_instance_uid if job.evidence_file else None,
        "deliveries": [
            {"kind": d.kind, "destination": d.destination, "item": d.item.value,
             **({"study_result_id": d.study_result_id, "message_id": d.message_id}
                if d.study_result_id is not None else {}),
             "state": d.state.value, "attempts": d.attempts,
             "last_status": d.last_status, "last_error": d.last_error,
             "next_attempt_at": d.next_attempt_at.isoformat(),
             "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None}
            for d in deliveries
        ],
    }


def _short(delivery: Delivery) -> str:
    """A destination's short name for the jobs table: the AE title, or the host."""
    if delivery.kind == "dicom":
        return delivery.destination.split("@")[0]
    if delivery.kind == "hl7":
        return f"hl7 {delivery.destination}"
    return f"{delivery.kind} {urlsplit(delivery.destination).netloc}"


def _store(config: Path | None, data_dir: Path | None) -> JobStore:
    settings = _settings(config, data_dir=data_dir)
    return JobStore(settings.database_url, max_attempts=settings.max_attempts,
                    study_quiet_seconds=settings.study_quiet_seconds)


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
                  "deliveries", "reason")
    for job in jobs:
        sent = ", ".join(f"{d.item.value}>{_short(d)}:{d.state.value}"
                         for d in deliveries[job.id])
        table.add_row(str(job.id), job.state.value, job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      job.calling_ae, str(job.attempts),
                      f"{job.label} ({UNVALIDATED_WARNING})" if job.model_validated is False
                      else job.label or "", sent,
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


@jobs_app.command("purge")
def jobs_purge(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only show what would be deleted, and why.")] = False,
) -> None:
    """Delete the files, then the rows, that retention_files_days and retention_rows_days
    let go (as the node does every hour); --dry-run shows them (ids, states, ages)."""
    from dicom_node.retention import Retention
    from dicom_node.spool import Spool

    settings = _settings(config, data_dir=data_dir)
    setup_logging("WARNING")
    if not settings.retention_files_days:
        typer.echo("retention_files_days is 0: files and rows are kept for ever")
        return
    with JobStore(settings.database_url, max_attempts=settings.max_attempts,
                  study_quiet_seconds=settings.study_quiet_seconds) as store:
        spool = Spool(settings.storage_dir, settings.min_free_disk_mb * 2**20)
        report = Retention(store, spool, settings.retention_files_days,
                           settings.retention_rows_days).run(dry_run=dry_run)
    verb = "would go" if dry_run else "deleted"
    assert report.files_cutoff is not None
    typer.echo(f"files finished before {report.files_cutoff:%Y-%m-%d %H:%M} UTC "
               f"({settings.retention_files_days} days), {verb}:")
    for item in report.purged:
        typer.echo(f"  {item.kind} {item.id}: {item.files} file(s); {item.reason}")
    typer.echo(report.summary())
    if report.failed_files:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Bring the database's schema to this release's revision (the node also does it
    at every start)."""
    from dicom_node import db

    settings = _settings(config, data_dir=data_dir)
    setup_logging("WARNING")
    engine = db.make_engine(settings.database_url)
    try:
        before, after = db.upgrade_schema(engine)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    typer.echo(f"at revision {after} (already)" if before == after
               else f"upgraded from {before or 'no revision'} to revision {after}")


@db_app.command("current")
def db_current(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show the database's schema revision and this release's; exit 1 when they differ."""
    from dicom_node import db

    settings = _settings(config, data_dir=data_dir)
    engine = db.make_engine(settings.database_url)
    try:
        current = db.current_revision(engine)
    finally:
        engine.dispose()
    head = db.head_revision()
    typer.echo(f"database: {current or 'no revision (empty, or made by release 0.1)'}")
    typer.echo(f"this release: {head}")
    if current != head:
        typer.echo("run `dicom-node db upgrade` (or start the node) to upgrade", err=True)
        raise typer.Exit(1)


@studies_app.command("list")
def studies_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    study: Annotated[str | None, typer.Option("--study", help="Only this Study Instance UID.")
                     ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List study results (every version), newest first."""
    from dicom_node.studies import StudyBook, describe

    with _store(config, data_dir) as store:
        found = [describe(s) for s in StudyBook(store).list(limit, study)]
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    table = Table("id", "study", "version", "state", "flagged", "label", "images", "model",
                  "problems")
    for row in found:
        flagged = "-" if row["flagged"] is None else ("+".join(row["flags"]) or "no")
        model = row["model_version"] or ""
        if row["model_validated"] is False:
            model += f" ({UNVALIDATED_WARNING})"
        table.add_row(str(row["id"]), row["study_instance_uid"], str(row["version"]),
                      row["state"], flagged, row["label"] or "", str(len(row["job_ids"])),
                      model, "; ".join(row["problems"]))
    Console().print(table)


def _audit_model(settings: Settings, model: tuple[str, str, str], validated: bool | None,
                 refusal: str | None) -> None:
    """Write one model-install event to the trail of administrative commands."""
    trail = audit.open_trail(settings.audit_dir, "admin", settings.ae_title,
                             settings.audit_max_mb * 2**20, settings.audit_backups,
                             settings.audit_syslog, settings.audit_syslog_ca)
    try:
        audit.model("installed", *model, validated, refusal)
    finally:
        trail.close()


audit_app = typer.Typer(help="Read the audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("tail")
def audit_tail(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many messages.")] = 20,
    event: Annotated[str | None, typer.Option(
        "--event", help="Only this EventID (code or name, e.g. 110113 or 'Security "
        "Alert').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The messages as JSON lines.")
                       ] = False,
) -> None:
    """The last messages of the audit trail (every process's file, oldest first)."""
    settings = _settings(config, data_dir=data_dir)
    found = list(audit.read(settings.audit_dir))
    if event:
        found = [m for m in found if event in (
            m["EventIdentification"]["EventID"]["csd-code"],
            m["EventIdentification"]["EventID"]["originalText"])]
    found = found[-lines:] if lines > 0 else found
    if as_json:
        for message in found:
            typer.echo(json.dumps(message))
        return
    table = Table("time", "event", "outcome", "who", "what", "detail")
    for message in found:
        table.add_row(*audit.summary(message))
    # Piped or redirected (rich would assume 80 columns): wide enough for UIDs.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


class Host:
    """What the node lends the commands of other packages: its settings (from
    ``--config``/``--data-dir``, the environment and the defaults; a bad value exits
    2 with the reason) and its logging set-up."""

    def settings(self, config: Path | None, data_dir: Path | None) -> Settings:
        return _settings(config, data_dir=data_dir)

    def setup_logging(self, level: str) -> None:
        setup_logging(level)

    def audit_model_install(self, settings: Settings, model: tuple[str, str, str],
                            validated: bool | None, refusal: str | None) -> None:
        """A model installed (or refused, with the reason) in the audit trail.

        Parameters
        ----------
        settings
            The node's settings (where the trail is).
        model
            Its name, version and sha256 (version and hash empty when its card was
            not read).
        validated
            Whether its card earns 'validated' (None: not known).
        refusal
            Why it was refused, or None.
        """
        _audit_model(settings, model, validated, refusal)


@app.callback()
def _program(ctx: typer.Context) -> None:
    # Every command finds the Host on its context (ctx.obj).
    ctx.obj = Host()


def _register_packages() -> None:
    """Add the commands of every package that declares them (entry points)."""
    found = sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name)
    if not found:  # run from a source tree that was never installed, or a stale install
        print("warning: the model and training commands are missing: install the project "
              "(make install, or pip install -e .)", file=sys.stderr)
    for package in found:
        package.load()(app)


_register_packages()


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
