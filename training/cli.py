"""Training's commands: ``prepare``, ``train`` and ``evaluate``.

:func:`register` adds them to the ``dicom-node`` program (entry point group
``dicom_node.commands``). They need the ``training`` extra (matplotlib,
scikit-learn): ``pip install 'dicom-node[training]'``; the node's own install
leaves it out. Each command parses its options and calls the package; the
pipeline itself is in :mod:`training.workflow`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from model.cli import Host, quiet_tensorflow

if TYPE_CHECKING:
    from training import workflow
    from training.sources import Record
    from training.train import TrainConfig


#: Rows (images) and augmented columns of ``prepare --preview-augmentation``.
PREVIEW_ROWS = 6
PREVIEW_AUGMENTATIONS = 5


def _host(ctx: typer.Context) -> Host:
    host: Host = ctx.obj
    return host


def register(app: typer.Typer) -> None:
    """Add ``prepare``, ``train`` and ``evaluate`` to ``app``."""
    for command in (prepare, train, evaluate):
        app.command()(command)


def _require_extra() -> None:
    """Exit 2 with the install command when the ``training`` extra is missing."""
    from importlib.util import find_spec

    missing = [name for name in ("sklearn", "matplotlib") if find_spec(name) is None]
    if missing:
        typer.echo(f"error: training needs {', '.join(missing)}: install the training extra "
                   "(pip install 'dicom-node[training]', or make install-test)", err=True)
        raise typer.Exit(2)


def prepare(
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the split files.")
                   ] = None,
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
    preview_augmentation: Annotated[Path | None, typer.Option(
        "--preview-augmentation", dir_okay=False,
        help="Write a PNG grid of the sources' images as training shows them: a row per "
        "image (the classes in turn), the original first, then random draws of the "
        "paper's augmentation (--seed). Without --out nothing else is written.")] = None,
) -> None:
    """Read datasets and write patient-level folds of phase-balanced training phases
    (or preview the training augmentation)."""
    _require_extra()
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
    if out is None and preview_augmentation is None:
        typer.echo("error: give --out (or --preview-augmentation)", err=True)
        raise typer.Exit(2)
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
    if preview_augmentation is not None:
        _preview(records, preview_augmentation, seed)
    if out is None:
        return
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


def _preview(records: list[Record], png: Path, seed: int) -> None:
    """Write the augmentation preview of ``records`` and say what its rows are."""
    quiet_tensorflow()
    from training import data

    rows = data.preview_records(records, PREVIEW_ROWS, seed)
    try:
        width, height = data.preview(rows, png, PREVIEW_AUGMENTATIONS, seed=seed)
    except (OSError, ValueError) as exc:  # PreprocessError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"augmentation preview: {png} ({width}x{height} px), first column the "
               f"input without augmentation, then {PREVIEW_AUGMENTATIONS} draws; rows:")
    for k, record in enumerate(rows, start=1):
        typer.echo(f"  {k}: {record.label} {record.path.name}")


def train(
    ctx: typer.Context,
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
    weights: Annotated[str, typer.Option(
        "--weights", help="imagenet (the paper's start: the backbones' ImageNet files, "
        "from the Keras cache), none (random) or FILE (the whole network).")] = "imagenet",
    unique_pneumonia: Annotated[int | None, typer.Option("--unique-pneumonia")] = None,
    unique_normal: Annotated[int | None, typer.Option("--unique-normal")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="clean or paper.")] = "clean",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    log: Annotated[Path | None, typer.Option(
        "--log", file_okay=False,
        help="Folder for the CSV logs and TensorBoard scalars (loss, accuracy by epoch).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the fold, phases and class counts, and time a few steps "
        "to estimate the run on this machine; train and write nothing.")] = False,
) -> None:
    """Train one fold the paper's way, then evaluate it on the fold's test set."""
    _require_extra()
    quiet_tensorflow()
    _host(ctx).setup_logging("INFO")
    from training import workflow

    if (data is None) == (paper_splits is None) or (paper_splits is not None and images is None):
        typer.echo("error: give either --data, or --paper-splits with --images", err=True)
        raise typer.Exit(2)
    if not 1 <= fold <= folds:
        typer.echo(f"error: --fold must be between 1 and {folds}", err=True)
        raise typer.Exit(2)
    _require_weights(arch, weights)
    plan = workflow.FoldPlan(folds=folds, fold=fold, phases=phases, protocol=protocol,
                             seed=seed, unique_pneumonia=unique_pneumonia,
                             unique_normal=unique_normal)
    try:
        if paper_splits is not None and images is not None:
            chosen = workflow.paper_fold(paper_splits, images, plan, out, write=not dry_run)
        else:
            assert data is not None
            chosen = workflow.data_fold(data, plan, out, write=not dry_run)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    config = workflow.train_config(chosen, architecture=arch, input_size=input_size,
                                   epochs_per_phase=epochs_per_phase, batch_size=batch_size,
                                   weights=weights, version=version)
    if dry_run:
        _dry_run(chosen, config)
        return
    run = workflow.train_and_evaluate(chosen, config, out / f"fold{fold}", log)
    from model import card

    status = card.validation_status(run.card)
    flag = "" if status.validated else " --allow-unvalidated"
    typer.echo(f"model: {run.artifact} ({run.card.architecture} {run.card.input_size}px); "
               f"test accuracy {run.evaluation['overall_accuracy']:.4f} on "
               f"{run.evaluation['images']} images; {status}; "
               f"install with: dicom-node model install{flag} {run.artifact}")


def _require_weights(arch: str, weights: str) -> None:
    """Exit 2, before any data is read, when the starting weights are not on this machine."""
    from model import network

    if arch not in network.ARCHITECTURES:
        typer.echo(f"error: --arch {arch!r} is not one of {', '.join(network.ARCHITECTURES)}",
                   err=True)
        raise typer.Exit(2)
    if weights == "imagenet":
        missing = network.missing_imagenet_files(arch)
        if missing:
            names = "".join(f"\n  {path.name}" for path in missing)
            typer.echo(
                "error: --weights imagenet (the default, the paper's start) needs Keras' "
                "ImageNet weights of the backbones, and this machine does not download "
                f"them. Missing from {missing[0].parent}:{names}\nCopy them there (or set "
                "KERAS_HOME to a folder whose models/ holds them), or train from random "
                "weights with --weights none (the model card records the starting weights).",
                err=True)
            raise typer.Exit(2)
    elif weights != "none" and not Path(weights).is_file():
        typer.echo(f"error: --weights {weights}: no such file (imagenet, none or a weights "
                   "file)", err=True)
        raise typer.Exit(2)


def _dry_run(chosen: workflow.ChosenFold, config: TrainConfig) -> None:
    """Print what the run would train and how long it would take here; train nothing."""
    from training import train as training
    from training import workflow

    for line in workflow.describe(chosen, config):
        typer.echo(line)
    fold = chosen.fold
    guess = training.estimate([len(p) for p in fold.phases], len(fold.validation), config)
    typer.echo(f"estimate on this machine: {guess.train_step:.2f} s per training step, "
               f"{guess.validation_step:.2f} s per validation step; {guess.train_steps} "
               f"training and {guess.validation_steps} validation steps: about "
               f"{training.duration(guess.seconds)} in all (an estimate from "
               f"{guess.steps_timed} timed steps of each kind on one device, not counting "
               "image decoding or graph building)")
    typer.echo("dry run: nothing trained, nothing written")


def evaluate(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Option("--model", exists=True, file_okay=False)],
    data: Annotated[Path, typer.Option("--data", exists=True,
                                       help="A CSV list or a folder per class.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json and the report.")],
    prevalence: Annotated[list[str] | None, typer.Option(
        "--prevalence", help="CLASS=FRACTION: report the PPV at this prevalence.")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="Show the paper's Table 4 row.")
                     ] = False,
    data_set: Annotated[str | None, typer.Option(
        "--data-set", help="What the test set is, as the model card names it (default: the "
        "--data folder's name, or folder/file of a CSV list).")] = None,
    record: Annotated[bool, typer.Option(
        "--record", help="Write the test evidence (and operating points) into the model "
        "card, where 'validated' is judged from it. Without it only the report is written.")
    ] = False,
    validation_data: Annotated[Path | None, typer.Option(
        "--validation-data", exists=True,
        help="Labelled images (never the test set's) that choose each class's threshold "
        "for its target sensitivity. Without it the card's own thresholds, if any, are "
        "measured.")] = None,
    target_sensitivity: Annotated[list[str] | None, typer.Option(
        "--target-sensitivity", help="CLASS=FRACTION (repeatable), or CLASS=none to drop "
        "a class; default covid=0.9 and pneumonia=0.9. Needs --validation-data.")] = None,
) -> None:
    """Evaluate a model on labelled images: the paper's tables, balanced accuracy, AUC,
    intervals, operating points, plots."""
    _require_extra()
    quiet_tensorflow()
    _host(ctx).setup_logging("WARNING")
    from model import card
    from training import evaluate as evaluation
    from training import sources

    given = {k: v for k, v in _class_fractions(prevalence or [], "--prevalence").items()
             if v is not None}
    if target_sensitivity and validation_data is None:
        typer.echo("error: --target-sensitivity needs --validation-data", err=True)
        raise typer.Exit(2)
    targets = {**evaluation.DEFAULT_TARGET_SENSITIVITY,
               **_class_fractions(target_sensitivity or [], "--target-sensitivity",
                                  allow_none=True)}
    try:
        validation = sources.read(validation_data) if validation_data is not None else []
        result = evaluation.evaluate_artifact(
            model_dir, sources.read(data), out, paper=paper, prevalence=given,
            data_set=data_set or evaluation.data_set_name(data), validation=validation,
            targets={k: v for k, v in targets.items() if v is not None})
    except (ValueError, OSError, card.ModelIntegrityError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"overall accuracy {result['overall_accuracy']:.4f}, balanced accuracy "
               f"{_maybe(result['balanced_accuracy'])} on {result['images']} images; "
               f"report: {out / 'report.md'}")
    if record:
        recorded = evaluation.record_in_card(model_dir, result)
        status = card.validation_status(recorded)
        typer.echo(f"recorded in {model_dir / card.CARD_FILE}; {status}")


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _class_fractions(items: list[str], option: str, allow_none: bool = False
                     ) -> dict[str, float | None]:
    """CLASS=FRACTION items (CLASS=none too, with ``allow_none``); exit 2 on a bad one."""
    from model.classes import CLASS_KEYS, index_of

    given: dict[str, float | None] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            name = CLASS_KEYS[index_of(key)]
            number = None if allow_none and value.strip() == "none" else float(value)
            if number is not None and not 0.0 < number <= 1.0:
                raise ValueError(f"{number} is not in (0, 1]")
        except ValueError as exc:
            typer.echo(f"error: {option} {item!r}: expected CLASS=FRACTION ({exc})", err=True)
            raise typer.Exit(2) from exc
        given[name] = number
    return given
