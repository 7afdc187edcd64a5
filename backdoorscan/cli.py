"""The ``backdoorscan`` command line: parses options, calls the library, renders the report.

Exit codes: 0 nothing found, 1 backdoor found, 2 error, 3 nothing scanned, 4 usage error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from backdoorscan._io import atomic_write_bytes, atomic_write_text
from backdoorscan._version import __version__
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.report import EXIT_ERROR, EXIT_USAGE, Report

DEMO_DIR = Path(__file__).parent / "data"


class ScanError(click.ClickException):
    """An error the user can act on: printed as one line, exit code 2."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise click.BadParameter(f"expected positive dimensions, got {text!r}")
    return dims


def _memory_size(text: str | None) -> int | None:
    if text is None:
        return None
    from backdoorscan.scanner.budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _clusters(text: str) -> int | str | tuple[int, ...]:
    from backdoorscan.scanner.config import parse_clusters

    try:
        return parse_clusters(str(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _writable_output(
    _ctx: click.Context, _param: click.Parameter, value: Path | None
) -> Path | None:
    """Fail before the work, not after it, when the output's folder is missing."""
    if value is not None and not (value.parent if str(value.parent) else Path(".")).is_dir():
        raise ScanError(f"output folder does not exist: {value.parent}")
    return value


def _stack(opts: list[Callable[..., Any]], fn: Callable[..., Any]) -> Callable[..., Any]:
    """Apply click option decorators so that they list in the order given."""
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Where the training data comes from, how it is read and where the model runs."""
    opts = [
        click.option(
            "--data",
            "data_path",
            required=True,
            type=click.Path(path_type=Path),
            help="Training data: .npz with arrays x and y, or .npy samples with --labels.",
        ),
        click.option(
            "--labels", type=click.Path(path_type=Path), help="Labels .npy, with --data x.npy."
        ),
        click.option(
            "--x-key", default="x", show_default=True, help="Array name of the samples in .npz."
        ),
        click.option(
            "--y-key", default="y", show_default=True, help="Array name of the labels in .npz."
        ),
        click.option(
            "--scale", type=float, help="Multiply samples by this first (e.g. 0.00392 for /255)."
        ),
        click.option(
            "--mean", help="Subtract this (one value, or one per channel, comma-separated)."
        ),
        click.option("--std", help="Then divide by this (one value, or one per channel)."),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help="Where ONNX Runtime runs; auto takes CUDA when it loads.",
        ),
    ]
    return _stack(opts, fn)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that tell a framework adapter how to load a model file."""
    opts = [
        click.option(
            "--arch",
            metavar="MODULE:CALLABLE",
            help="PyTorch state dicts: the architecture to load the weights into.",
        ),
        click.option(
            "--arch-kwargs", metavar="JSON", help="Keyword arguments for --arch, as JSON."
        ),
        click.option(
            "--input-shape",
            metavar="C,H,W",
            help="Per-sample input shape, for PyTorch state dicts.",
        ),
        click.option(
            "--layer",
            metavar="NAME",
            help="Hidden layer to cluster (ONNX tensor, PyTorch module path or Keras "
            "layer name). Default: the input of the last linear layer.",
        ),
    ]
    return _stack(opts, fn)


def _adapter_kwargs(
    arch: str | None, arch_kwargs: str | None, input_shape: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if arch:
        out["arch"] = arch
    if arch_kwargs:
        try:
            out["arch_kwargs"] = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"--arch-kwargs is not valid JSON: {exc.msg}") from None
        if not isinstance(out["arch_kwargs"], dict):
            raise click.BadParameter("--arch-kwargs must be a JSON object")
    shape = _shape(input_shape)
    if shape:
        out["input_shape"] = shape
    return out


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the library's errors into one-line messages with exit code 2."""
    from backdoorscan.adapters.base import AdapterError
    from backdoorscan.scanner.data import DataError
    from backdoorscan.scanner.exre import ExreError
    from backdoorscan.scanner.extract import ExtractionError

    try:
        yield
    except (AdapterError, DataError, ExtractionError, ExreError) as exc:
        raise ScanError(str(exc)) from None
    except MemoryError:
        raise ScanError("out of memory; lower --batch-size or scan a subset") from None
    except (OSError, ValueError) as exc:
        raise ScanError(f"{type(exc).__name__}: {exc}") from None


@contextmanager
def _progress(enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A progress bar on stderr, shown only when stderr is a terminal."""
    state: dict[str, Any] = {}

    def start(total: int) -> None:
        if enabled and sys.stderr.isatty():
            bar = click.progressbar(length=total, label="extracting activations", file=sys.stderr)
            state["bar"] = bar.__enter__()

    def step(n: int) -> None:
        if "bar" in state:
            state["bar"].update(n)

    try:
        yield start, step
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


def _emit(report: Report, fmt: str, output: Path | None, quiet: bool) -> None:
    text = report.render(fmt)
    if output is not None:
        with _errors():
            atomic_write_text(output, text)
        if not quiet:
            click.echo(report.to_text() if fmt != "text" else text, nl=False)
            click.echo(f"report written to {output}", err=True)
    elif not quiet or fmt != "text":
        click.echo(text, nl=False)


def _detect_config(**kw: Any) -> Any:
    rule = tuple(r.strip() for r in kw.pop("rule").split(",") if r.strip())
    try:
        return DetectConfig(rule=rule, **kw)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_D = DetectConfig()


def detect_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the clustering and of the decision rule (defaults from DetectConfig)."""
    opts = [
        click.option(
            "--reduce",
            default=_D.reduce,
            show_default=True,
            help="Dimensionality reduction per class: pca, ica or none, or several joined by "
            "'+' (each is clustered).",
        ),
        click.option(
            "--n-components",
            type=click.IntRange(1),
            default=_D.n_components,
            show_default=True,
            help="Dimensions to reduce to.",
        ),
        click.option(
            "--clusters",
            "n_clusters",
            default=_D.n_clusters
            if isinstance(_D.n_clusters, (int, str))
            else ",".join(map(str, _D.n_clusters)),
            show_default=True,
            callback=lambda _c, _p, v: _clusters(v),
            help="Values of k for k-means per class, comma-separated (every cluster of every "
            f"k that holds at most {_D.max_share:.0%} of its class is a candidate), or 'auto' "
            f"(the smallest k in 2..{_D.max_clusters} whose silhouette is within 0.01 of the "
            "best).",
        ),
        click.option(
            "--size-threshold",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=_D.size_threshold,
            show_default=True,
            help="The size analysis (the paper's rule): a candidate cluster holding less than "
            "this share of its class votes 'small'. It decides where the rule names size "
            "(--rule, or the size,separation fallback when the transfer test cannot run); "
            f"every cluster of at most {_D.max_share:.0%} of its class is a candidate.",
        ),
        click.option(
            "--separation-threshold",
            type=click.FloatRange(0),
            default=_D.separation_threshold,
            show_default=True,
            help="The separation analysis: a candidate whose gap to the rest of its class, "
            "along the line joining their means, is at least this many pooled standard "
            "deviations votes 'apart'. It decides where the rule names separation (see "
            "--size-threshold).",
        ),
        click.option(
            "--transfer-threshold",
            type=click.FloatRange(0, 1),
            default=_D.transfer_threshold,
            show_default=True,
            help="The transfer analysis: a candidate is poison when at least this share of "
            "other classes' samples, stamped with the perturbation its samples share, is "
            "classified as its label by the model.",
        ),
        click.option(
            "--rule",
            default=",".join(_D.rule),
            show_default=True,
            help="Analyses that one candidate cluster must all pass to flag its class, "
            "comma-separated (transfer, size, separation, silhouette, distance).",
        ),
        click.option(
            "--threads",
            "n_jobs",
            type=click.IntRange(0),
            default=_D.n_jobs,
            show_default=True,
            help="CPU threads for the model (ONNX Runtime) and for the per-class analysis, "
            "one class per thread (0: ONNX Runtime's default for the model, every core this "
            "process may use for the classes). The report does not depend on it.",
        ),
        click.option("--seed", type=int, default=_D.seed, show_default=True, help="Random seed."),
    ]
    return _stack(opts, fn)


def exre_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of exclusionary reclassification (ExRe)."""
    opts = [
        click.option(
            "--exre",
            type=click.Choice(["auto", "full", "probe", "both"]),
            is_flag=False,
            flag_value="auto",
            default=None,
            help="Exclusionary reclassification of the suspicious clusters: full (retrain the "
            "model without them), probe (classifier on the activations), both; bare --exre: "
            "full where the model can be retrained, else probe.",
        ),
        click.option(
            "--exre-threshold",
            type=click.FloatRange(0, min_open=True),
            default=1.0,
            show_default=True,
            help="A cluster is poison when its own-label share over its top other class's "
            "share falls under this.",
        ),
        click.option(
            "--exre-epochs",
            type=click.IntRange(1),
            default=1,
            show_default=True,
            help="Epochs of ExRe's retraining from scratch (at least 400 optimizer steps).",
        ),
    ]
    return _stack(opts, fn)


def _exre_config(kw: dict[str, Any]) -> Any:
    """Pop the ExRe options from ``kw``; an ExreConfig, or None when --exre was not given."""
    from backdoorscan.scanner.exre import ExreConfig

    method, threshold, epochs = kw.pop("exre"), kw.pop("exre_threshold"), kw.pop("exre_epochs")
    if method is None:
        return None
    return ExreConfig(method=method, threshold=threshold, epochs=epochs, seed=kw.get("seed", 0))


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report format, destination and verbosity."""
    opts = [
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="Report format.",
        ),
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            callback=_writable_output,
            help="Write the report to this file (atomically); stdout then gets the text "
            "summary only (nothing with -q).",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."),
    ]
    return _stack(opts, fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="backdoorscan")
def cli() -> None:
    """Find backdoor poisoning in a model and its training data (Activation Clustering).

    \b
    Exit codes: 0 nothing found, 1 backdoor found, 2 error, 3 nothing scanned, 4 usage error.
    Example:
      backdoorscan scan model.onnx --data train.npz --format json -o report.json
    """


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option(
    "--max-memory",
    metavar="SIZE",
    callback=lambda _c, _p, v: _memory_size(v),
    help="Memory the scan's arrays may use, e.g. 2G or 512M; a scan estimated to need more is "
    "refused before extraction. Default: the machine's (or container's) memory.",
)
@model_options
@detect_options
@exre_options
@output_options
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
    """
    from backdoorscan.scanner import scan as run_scan

    exre = _exre_config(detect_kw)
    cfg = _detect_config(**detect_kw)
    kwargs = _adapter_kwargs(arch, arch_kwargs, input_shape)
    with _errors(), _progress(not quiet) as (start, step):
        report = run_scan(
            model,
            data=data_path,
            labels=labels,
            x_key=x_key,
            y_key=y_key,
            layer=layer,
            device=device,
            batch_size=batch_size,
            max_memory=max_memory,
            scale=scale,
            mean=_floats(mean),
            std=_floats(std),
            config=cfg,
            progress=step,
            on_extract_start=start,
            exre=exre,
            **kwargs,
        )
    _emit(report, fmt, output, quiet)
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
    default=1,
    show_default=True,
    help="Epochs of retraining from the current weights.",
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
    callback=_writable_output,
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
@model_options
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
    **detect_kw: Any,
) -> None:
    """Scan MODEL, relabel or remove the poison it finds, retrain, save, and scan again.

    \b
    Exit codes: 0 the rescan finds no backdoor (or a bare ONNX model's cleaned data set was
    written), 1 a backdoor is still found, 2 error, 3 nothing scanned.
    Examples:
      backdoorscan repair weights.pt --arch mypkg:Net --input-shape 1,28,28 --data train.npz \\
        --epochs 3 --test clean_test.npz --trigger-test triggered_test.npz -o repaired.pt
      backdoorscan repair model.onnx --data train.npz -o cleaned.npz
    """
    from backdoorscan.scanner.repair import exit_code
    from backdoorscan.scanner.repair import repair as run_repair

    exre = _exre_config(detect_kw)
    cfg = _detect_config(**detect_kw)
    kwargs = _adapter_kwargs(arch, arch_kwargs, input_shape)
    with _errors():
        report = run_repair(
            model,
            data=data_path,
            labels=labels,
            x_key=x_key,
            y_key=y_key,
            output=output,
            strategy=strategy,
            epochs=epochs,
            lr=lr,
            batch_size=train_batch_size,
            seed=cfg.seed,
            exre=exre,
            test=test,
            trigger_test=trigger_test,
            data_output=data_out,
            layer=layer,
            device=device,
            scale=scale,
            mean=_floats(mean),
            std=_floats(std),
            config=cfg,
            **kwargs,
        )
    _emit(report, fmt, report_path, quiet)
    sys.exit(exit_code(report))


@cli.command()
@output_options
def demo(fmt: str, output: Path | None, quiet: bool) -> None:
    """Scan the shipped demo: an 8x8-digits classifier with a planted backdoor (exit 1).

    \b
    Some 7s carry a 2x2 trigger in the corner and are labelled 1; the scan should find them.
    Example:
      backdoorscan demo
    """
    import numpy as np

    from backdoorscan.scanner import scan as run_scan

    data = DEMO_DIR / "demo.npz"
    with _errors(), _progress(not quiet) as (start, step):
        report = run_scan(
            DEMO_DIR / "demo.onnx",
            data=data,
            config=DetectConfig(),
            progress=step,
            on_extract_start=start,
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
    _emit(report, fmt, output, quiet)
    sys.exit(report.exit_code)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@model_options
def layers(
    model: Path,
    arch: str | None,
    arch_kwargs: str | None,
    input_shape: str | None,
    layer: str | None,
) -> None:
    """List the hidden tensors of MODEL that can be clustered; the default is marked with *.

    \b
    Example:
      backdoorscan layers model.onnx
    """
    from backdoorscan import adapters

    kwargs = _adapter_kwargs(arch, arch_kwargs, input_shape)
    with _errors():
        adapter = adapters.load(model, **kwargs)
        rows = adapter.layers()  # type: ignore[attr-defined]
    if not rows:
        raise ScanError("no candidate hidden layers found")
    for row in rows:
        name, op, shape, default = _layer_row(row)
        dims = "x".join("?" if d is None or isinstance(d, str) else str(d) for d in shape) or "?"
        click.echo(f"{'*' if default else ' '} {name:<40} {op:<20} {dims}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    callback=_writable_output,
    help="Where to write the ONNX file (atomically).",
)
@model_options
def export(
    model: Path,
    output: Path,
    arch: str | None,
    arch_kwargs: str | None,
    input_shape: str | None,
    layer: str | None,
) -> None:
    """Export MODEL to ONNX with two outputs, logits and features (the layer that is clustered).

    \b
    Examples:
      backdoorscan export weights.pt --arch mypkg.models:Net --input-shape 1,28,28 --layer fc1 \\
        -o model.onnx
      backdoorscan export model.keras -o model.onnx
    """
    from backdoorscan import adapters

    kwargs = _adapter_kwargs(arch, arch_kwargs, input_shape)
    with _errors():
        exported = adapters.load(model, **kwargs).to_onnx(layer)
        atomic_write_bytes(output, exported.model_bytes)
    dims = "x".join("?" if d is None else str(d) for d in exported.input_shape)
    click.echo(
        f"wrote {output}: input {exported.input_name} [{dims}] {exported.input_dtype}, "
        f"features from {exported.layer!r} ({exported.feature_dim or '?'} values)"
    )
    for note in exported.notes:
        click.echo(f"  note: {note}")


def _layer_row(row: Any) -> tuple[str, str, tuple[Any, ...], bool]:
    if hasattr(row, "name"):
        return row.name, row.op_type, tuple(row.shape), bool(row.default)
    name, op, shape, *rest = row
    return name, op, tuple(shape or ()), bool(rest[0]) if rest else False


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every outcome to the documented exit codes."""
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        rv = cli.main(args=argv, prog_name="backdoorscan", standalone_mode=False)
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
