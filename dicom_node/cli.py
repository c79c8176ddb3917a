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
    # pynetdicom logs every PDU at INFO; keep its chatter (never identifiers) at WARNING.
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if level == "DEBUG" else logging.WARNING
    )


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
) -> None:
    """Run the node: receive chest radiographs and queue them for classification."""
    from dicom_node.node import Node

    settings = _settings(
        config,
        ae_title=ae_title,
        host=host,
        port=port,
        data_dir=data_dir,
        allowed_calling_ae=allow_calling_ae or None,
        accept_any_calling_ae=accept_any_calling_ae,
    )
    _setup_logging(settings.log_level)
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


def _job_dict(job: Job) -> dict[str, Any]:
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
    store = _store(config, data_dir)
    try:
        jobs = store.list(state=state, limit=limit)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([_job_dict(j) for j in jobs], indent=2))
        return
    table = Table("id", "state", "received (UTC)", "calling AE", "attempts", "label", "reason")
    for job in jobs:
        table.add_row(str(job.id), job.state.value, job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      job.calling_ae, str(job.attempts), job.label or "",
                      job.last_error or job.intake_reason)
    Console().print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: int,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show every field of one job as JSON."""
    store = _store(config, data_dir)
    try:
        job = store.get(job_id)
    finally:
        store.close()
    if job is None:
        typer.echo(f"error: no job with id {job_id}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(_job_dict(job), indent=2))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
