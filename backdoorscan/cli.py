"""The ``backdoorscan`` command line: parses options, calls the library, renders the report.

Exit codes: 0 no poison found in the training samples given, 1 backdoor found, 2 error,
3 nothing (meaningful) scanned, 4 usage error. The options live in ``cli_options.py``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from backdoorscan._io import atomic_write_bytes
from backdoorscan._version import __version__
from backdoorscan.cli_data import published_options
from backdoorscan.cli_options import (
    ScanError,
    build_detect_config,
    build_model_options,
    build_run_options,
    class_progress,
    data_options,
    detect_options,
    emit,
    errors,
    exre_options,
    isolation_options,
    model_options,
    output_options,
    parse_memory,
    pop_exre_config,
    progress_bar,
    refuse_overwrite,
    report_options,
    writable_output,
)
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.report import EXIT_ERROR, EXIT_USAGE

DEMO_DIR = Path(__file__).parent / "data"


def _set_verbose(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    from backdoorscan.scanner.scanlog import set_verbose, show_status

    # The lines of long steps (export, ExRe, repair epochs) on a terminal, unless --quiet.
    def shown() -> bool:  # asked at each line: inside a command that is not --quiet
        ctx = click.get_current_context(silent=True)
        return ctx is not None and not ctx.params.get("quiet")

    show_status(shown)
    set_verbose(value)


verbose_option = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    expose_value=False,
    callback=_set_verbose,
    help="Log what each step decided (layer, provider, each class, the transfer test, ExRe, "
    "each repair epoch) on stderr.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="backdoorscan")
def cli() -> None:
    """Find backdoor poisoning in a model and its training data (Activation Clustering).

    \b
    Exit codes: 0 no poison found in the training samples given, 1 backdoor found, 2 error,
    3 nothing (meaningful) scanned, 4 usage error.
    Example:
      backdoorscan scan model.onnx --data train.npz --format json -o report.json
    """


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@published_options
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option(
    "--max-memory",
    metavar="SIZE",
    callback=lambda _c, _p, v: parse_memory(v),
    help="Memory the scan's arrays may use, e.g. 2G or 512M; a scan estimated to need more is "
    "refused before extraction. Default: the machine's (or container's) memory.",
)
@model_options
@isolation_options
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: the extraction in Ray Data actors, each class's analysis in a Ray task, the "
    "model's queries in one actor (pip install 'backdoorscan[ray]'; needs --trust-model for a "
    "model file).",
)
@click.option(
    "--ray-address",
    metavar="ADDRESS",
    help="Ray cluster to join (auto, ray://host:10001); default: a local instance on this "
    "machine's cores.",
)
@click.option(
    "--ray-spill-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --engine ray: the folder (every node's path to it) where the extraction's "
    "outputs are spilled, one file per batch, removed when the scan ends. Default: the "
    "temporary folder.",
)
@click.option(
    "--ray-spill-above",
    metavar="SIZE",
    default="1G",
    show_default=True,
    callback=lambda _c, _p, v: parse_memory(v),
    help="With --engine ray: spill the extraction's outputs (features, predictions, input "
    "sketch) when they come to SIZE or more; smaller ones go through Ray's object store.",
)
@detect_options
@exre_options
@output_options
@verbose_option
def scan(
    model: Path,
    data_path: Path,
    labels: Path | None,
    x_key: str,
    y_key: str,
    scale: float | None,
    mean: str | None,
    std: str | None,
    device: str,
    batch_size: int,
    max_memory: int | None,
    arch: str | None,
    arch_kwargs: str | None,
    input_shape: str | None,
    layer: str | None,
    timeout: float,
    trust_model: bool,
    engine: str,
    ray_address: str | None,
    ray_spill_dir: Path | None,
    ray_spill_above: int,
    fmt: str,
    output: Path | None,
    quiet: bool,
    **detect_kw: Any,
) -> None:
    """Scan MODEL with the data it was trained on; report the classes that hold poison.

    \b
    Examples:
      backdoorscan scan model.onnx --data train.npz
      backdoorscan scan model.onnx --data x.npy --labels y.npy --scale 0.00392 \\
        --format json -o report.json
      backdoorscan scan weights.pt --arch mypkg.models:Net --input-shape 1,28,28 --data train.npz
      backdoorscan scan ./bert-finetuned/ --data train.csv --text-column sentence
      backdoorscan scan ./vit-finetuned/ --data images/
      backdoorscan scan model.onnx --data 'shards/train-*.npz' --engine ray --trust-model
    """
    from backdoorscan.scanner.pipeline import Progress
    from backdoorscan.scanner.pipeline import scan as run_scan

    exre = pop_exre_config(detect_kw)
    cfg = build_detect_config(**detect_kw)
    opts = build_run_options(
        device, batch_size, max_memory, scale, mean, std, x_key, y_key, timeout, trust_model,
        engine, ray_address,
    )  # fmt: skip
    if ray_spill_dir is not None and engine != "ray":
        raise click.BadParameter("--ray-spill-dir needs --engine ray")
    opts = dataclasses.replace(
        opts, ray_spill_dir=None if ray_spill_dir is None else str(ray_spill_dir),
        ray_spill_above=ray_spill_above,
    )  # fmt: skip
    mopts = build_model_options(layer, arch, arch_kwargs, input_shape)
    refuse_overwrite(output, model, data_path, labels)
    with errors(), progress_bar(not quiet) as (start, step):
        report = run_scan(
            model,
            data=data_path,
            labels=labels,
            options=opts,
            model_options=mopts,
            config=cfg,
            exre=exre,
            progress=Progress(start, step, class_progress(not quiet)),
        )
    report.command = _command_line()
    emit(report, fmt, output, quiet)
    sys.exit(report.exit_code)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option(
    "--strategy",
    type=click.Choice(["relabel", "remove"]),
    default="relabel",
    show_default=True,
    help="relabel: flagged samples get their suspected source label; remove: drop them.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Budget: at most this many epochs of retraining from the current weights; it stops "
    "at the first epoch that meets --max-asr and --max-acc-drop.",
)
@click.option(
    "--max-asr",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Done when the attack success rate (on --trigger-test, else on held-out samples "
    "stamped with the trigger the scan estimated) is below this.",
)
@click.option(
    "--max-acc-drop",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="...and clean accuracy (on --test, else on held-out samples) has dropped by at most "
    "this much.",
)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--train-batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--test",
    type=click.Path(path_type=Path),
    help="Clean test set (.npz x, y): clean accuracy before and after.",
)
@click.option(
    "--trigger-test",
    type=click.Path(path_type=Path),
    help="Test samples carrying the trigger, with their TRUE labels (.npz x, y): attack "
    "success rate before and after.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    callback=writable_output,
    help="The repaired model, in its own format (an ONNX copy goes to <stem>.onnx); for a bare "
    "ONNX model, the cleaned data set (.npz).",
)
@click.option(
    "--data-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the cleaned data set here (.npz: x, y, changed, removed, original_index).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report to this file (atomically).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Report format.",
)
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
@verbose_option
@model_options
@isolation_options
@detect_options
@exre_options
def repair(
    model: Path,
    data_path: Path,
    labels: Path | None,
    x_key: str,
    y_key: str,
    scale: float | None,
    mean: str | None,
    std: str | None,
    device: str,
    strategy: str,
    epochs: int,
    lr: float,
    max_asr: float,
    max_acc_drop: float,
    train_batch_size: int,
    test: Path | None,
    trigger_test: Path | None,
    output: Path,
    data_out: Path | None,
    report_path: Path | None,
    fmt: str,
    quiet: bool,
    arch: str | None,
    arch_kwargs: str | None,
    input_shape: str | None,
    layer: str | None,
    timeout: float,
    trust_model: bool,
    **detect_kw: Any,
) -> None:
    """Scan MODEL, relabel or remove the poison it finds, retrain until the attack is gone,
    save, and scan the repaired model again with the original training data.

    \b
    Exit codes: 0 the attack success rate fell below --max-asr with clean accuracy held and the
    rescan of the original data is clean (or a bare ONNX model's cleaned data set was written),
    1 "repair failed" or a backdoor is still found, 2 error, 3 nothing scanned.
    Examples:
      backdoorscan repair weights.pt --arch mypkg:Net --input-shape 1,28,28 --data train.npz \\
        --test clean_test.npz --trigger-test triggered_test.npz -o repaired.pt
      backdoorscan repair model.onnx --data train.npz -o cleaned.npz
    """
    from backdoorscan.scanner.repair import RepairConfig, exit_code
    from backdoorscan.scanner.repair import repair as run_repair

    exre = pop_exre_config(detect_kw)
    budget = {"max_asr": max_asr, "max_acc_drop": max_acc_drop}
    cfg = build_detect_config(**detect_kw)
    opts = build_run_options(
        device, 256, None, scale, mean, std, x_key, y_key, timeout, trust_model
    )
    mopts = build_model_options(layer, arch, arch_kwargs, input_shape)
    for out in (output, data_out, report_path):
        refuse_overwrite(out, model, data_path, labels, test, trigger_test)
    outs = [p.resolve() for p in (output, output.with_suffix(".onnx"), data_out, report_path) if p]
    if len(set(outs)) < len(outs):
        raise ScanError("-o, --data-out and --report must name different files")
    with errors():
        rcfg = RepairConfig(
            strategy=strategy, epochs=epochs, lr=lr, train_batch_size=train_batch_size, **budget
        )
        report = run_repair(
            model,
            data=data_path,
            labels=labels,
            output=output,
            exre=exre,
            test=test,
            trigger_test=trigger_test,
            data_output=data_out,
            options=opts,
            model_options=mopts,
            config=cfg,
            repair_config=rcfg,
        )
    report.command = _command_line()
    emit(report, fmt, report_path, quiet)
    sys.exit(exit_code(report))


@cli.command()
@output_options
@verbose_option
def demo(fmt: str, output: Path | None, quiet: bool) -> None:
    """Scan the shipped demo: an 8x8-digits classifier with a planted backdoor (exit 1).

    \b
    Some 7s carry a 2x2 trigger in the corner and are labelled 1; the scan should find them.
    Example:
      backdoorscan demo
    """
    import numpy as np

    from backdoorscan.scanner.pipeline import Progress
    from backdoorscan.scanner.pipeline import scan as run_scan

    data = DEMO_DIR / "demo.npz"
    refuse_overwrite(output, DEMO_DIR / "demo.onnx", data)
    with errors(), progress_bar(not quiet) as (start, step):
        report = run_scan(
            DEMO_DIR / "demo.onnx",
            data=data,
            config=DetectConfig(),
            progress=Progress(start, step, class_progress(not quiet)),
        )
        with np.load(data, allow_pickle=False) as arrays:
            truth = arrays["poison"]
    flagged = report.is_flagged()
    tp = int((flagged & truth).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    report.notes.append(
        f"demo truth: {int(truth.sum())} poisoned samples (7s with the trigger, labelled 1); "
        f"flagged {int(flagged.sum())}, precision {precision:.2f}, recall {recall:.2f}"
    )
    report.command = _command_line()
    emit(report, fmt, output, quiet)
    sys.exit(report.exit_code)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@isolation_options
def layers(
    model: Path,
    arch: str | None,
    arch_kwargs: str | None,
    input_shape: str | None,
    layer: str | None,
    timeout: float,
    trust_model: bool,
) -> None:
    """List the hidden tensors of MODEL that can be clustered; the default is marked with *.

    \b
    Example:
      backdoorscan layers model.onnx
    """
    from backdoorscan.scanner.config import RunOptions
    from backdoorscan.scanner.pipeline import list_layers

    mopts = build_model_options(layer, arch, arch_kwargs, input_shape)
    with errors():
        rows = list_layers(model, mopts, RunOptions(timeout=timeout, trust_model=trust_model))
    if not rows:
        raise ScanError("no candidate hidden layers found")
    for row in rows:
        dims = "x".join("?" if d is None or isinstance(d, str) else str(d) for d in row.shape)
        click.echo(f"{'*' if row.default else ' '} {row.name:<40} {row.op_type:<20} {dims or '?'}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    callback=writable_output,
    help="Where to write the ONNX file (atomically).",
)
@model_options
@isolation_options
def export(
    model: Path,
    output: Path,
    arch: str | None,
    arch_kwargs: str | None,
    input_shape: str | None,
    layer: str | None,
    timeout: float,
    trust_model: bool,
) -> None:
    """Export MODEL to ONNX with two outputs, logits and features (the layer that is clustered).

    \b
    Examples:
      backdoorscan export weights.pt --arch mypkg.models:Net --input-shape 1,28,28 --layer fc1 \\
        -o model.onnx
      backdoorscan export model.keras -o model.onnx
    """
    from backdoorscan.scanner.config import RunOptions
    from backdoorscan.scanner.pipeline import prepare

    mopts = build_model_options(layer, arch, arch_kwargs, input_shape)
    ropts = RunOptions(timeout=timeout, trust_model=trust_model)
    refuse_overwrite(output, model)
    with errors(), prepare(model, None, mopts, ropts) as prepared:
        exported = prepared.export
        atomic_write_bytes(output, exported.model_bytes)
    dims = "x".join("?" if d is None else str(d) for d in exported.input_shape)
    click.echo(
        f"wrote {output}: input {exported.input_name} [{dims}] {exported.input_dtype}, "
        f"features from {exported.layer!r} ({exported.feature_dim or '?'} values)"
    )
    for note in exported.notes:
        click.echo(f"  note: {note}")


@cli.command("report")
@click.argument(
    "report_path", metavar="REPORT.json", type=click.Path(dir_okay=False, path_type=Path)
)
@report_options
def report_cmd(
    report_path: Path, fmt: str, output: Path | None, data_path: Path | None, x_key: str,
    quiet: bool,
) -> None:  # fmt: skip
    """Render a saved JSON report again, as HTML, SARIF, text or JSON.

    \b
    The mosaics of the HTML report are drawn from the data (--data), which the JSON does not
    hold; the projections, the trigger and the figures are in the JSON. Exit codes as for the
    scan that wrote the report: 0 clean, 1 backdoor found, 3 nothing scanned; 2 error.
    Examples:
      backdoorscan scan model.onnx --data train.npz --format json -o report.json
      backdoorscan report report.json --format html --data train.npz -o report.html
      backdoorscan report report.json --format sarif -o scan.sarif
    """
    import json

    from backdoorscan.scanner.html import load_samples
    from backdoorscan.scanner.report import SCHEMA_VERSION, Report

    refuse_overwrite(output, report_path, data_path)
    with errors():
        try:
            doc = json.loads(report_path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or (doc.get("tool") or {}).get("name") != "backdoorscan":
                raise TypeError("no tool.name 'backdoorscan'")
            if int(doc.get("schema_version", 0)) > SCHEMA_VERSION:
                raise ScanError(
                    f"{report_path} has report schema {doc['schema_version']}, newer than this "
                    f"backdoorscan's ({SCHEMA_VERSION}): upgrade backdoorscan to render it"
                )
            report = Report.from_dict(doc)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ScanError(f"{report_path} is not a backdoorscan JSON report: {exc}") from None
        if data_path is not None:
            report.samples = load_samples(data_path, x_key)
    if report.samples is not None and len(report.samples) != len(report.scores):
        raise ScanError(
            f"{data_path} holds {len(report.samples)} samples but the report was made from "
            f"{len(report.scores)}: not the data that was scanned"
        )
    emit(report, fmt, output, quiet)
    sys.exit(report.exit_code)


def _command_line() -> str | None:
    """The command line of this run, shell-quoted, as ``main`` received it (None elsewhere)."""
    import shlex

    argv = click.get_current_context().find_root().obj
    return shlex.join(["backdoorscan", *argv]) if isinstance(argv, list) else None


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every outcome to the documented exit codes."""
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        args = sys.argv[1:] if argv is None else [str(a) for a in argv]
        # The command line goes into the report (_command_line).
        rv = cli.main(args=args, prog_name="backdoorscan", standalone_mode=False,
                      obj=args)  # fmt: skip
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted; no report was written", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("error: interrupted; no report was written", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not a finding: never let it exit 1 ("backdoor found")
        if os.environ.get("BACKDOORSCAN_DEBUG"):
            raise
        click.echo(
            f"error: internal error ({type(exc).__name__}: {exc}); rerun with "
            "BACKDOORSCAN_DEBUG=1 for the traceback and please report it",
            err=True,
        )
        sys.exit(EXIT_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
