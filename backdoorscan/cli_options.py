"""The command line's options, their parsers and the helpers every command shares.

Kept apart from ``cli.py`` (the commands) so that each reads in one sitting. Nothing here
imports ONNX Runtime or Numba: ``backdoorscan --help`` must stay light.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from backdoorscan._io import atomic_write_text
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.report import EXIT_ERROR, Report


class ScanError(click.ClickException):
    """An error the user can act on: printed as one line, exit code 2."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def parse_floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise click.BadParameter(f"expected positive dimensions, got {text!r}")
    return dims


def parse_memory(text: str | None) -> int | None:
    if text is None:
        return None
    from backdoorscan.scanner.budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_clusters_option(text: str) -> int | str | tuple[int, ...]:
    from backdoorscan.scanner.config import parse_clusters

    try:
        return parse_clusters(str(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def writable_output(
    _ctx: click.Context, _param: click.Parameter, value: Path | None
) -> Path | None:
    """Fail before the work, not after it, when the output's folder is missing."""
    if value is not None and not (value.parent if str(value.parent) else Path(".")).is_dir():
        raise ScanError(f"output folder does not exist: {value.parent}")
    return value


def stack_options(opts: list[Callable[..., Any]], fn: Callable[..., Any]) -> Callable[..., Any]:
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
            help="Training data: .npz with arrays x and y, or .npy samples with --labels, or "
            "a quoted glob of .npz shards ('shards/train-*.npz', taken in sorted order); or a "
            ".csv/.jsonl/.parquet table of texts and labels, or a folder of images, one "
            "sub-folder per class.",
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
    return stack_options(opts, fn)


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
    return stack_options(opts, fn)


def isolation_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How far an untrusted model file is trusted: where it runs and for how long."""
    opts = [
        click.option(
            "--timeout",
            type=click.FloatRange(0, min_open=True),
            default=600.0,
            show_default=True,
            metavar="SECONDS",
            help="Longest one request to the model's worker process may take (loading, "
            "exporting, one batch); past it the worker is killed and the command exits 2.",
        ),
        click.option(
            "--trust-model",
            is_flag=True,
            help="Load the model file in this process, without the confined worker (see "
            "SECURITY.md): only for files you trust. Needed for --engine ray.",
        ),
    ]
    return stack_options(opts, fn)


def build_model_options(
    layer: str | None, arch: str | None, arch_kwargs: str | None, input_shape: str | None
) -> Any:
    """How the adapter loads the model, from the command line's words."""
    from backdoorscan.scanner.config import ModelOptions

    kwargs: dict[str, Any] = {}
    if arch_kwargs:
        try:
            kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"--arch-kwargs is not valid JSON: {exc.msg}") from None
        if not isinstance(kwargs, dict):
            raise click.BadParameter("--arch-kwargs must be a JSON object")
    shape = parse_shape(input_shape)
    return ModelOptions(layer=layer, arch=arch, arch_kwargs=kwargs, input_shape=shape)


def build_run_options(
    device: str,
    batch_size: int,
    max_memory: int | None,
    scale: float | None,
    mean: str | None,
    std: str | None,
    x_key: str,
    y_key: str,
    timeout: float | None = 600.0,
    trust_model: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> Any:
    """The run options, built once from the command line."""
    from backdoorscan.cli_data import published_settings
    from backdoorscan.scanner.config import RunOptions

    if ray_address is not None and engine != "ray":
        raise click.BadParameter("--ray-address needs --engine ray")
    return RunOptions(
        timeout=timeout,
        trust_model=trust_model,
        engine=engine,
        ray_address=ray_address,
        device=device,
        batch_size=batch_size,
        max_memory=max_memory,
        scale=scale,
        mean=parse_floats(mean),
        std=parse_floats(std),
        x_key=x_key,
        y_key=y_key,
        **published_settings(),  # --text-column, --image-size, ... (cli_data.py)
    )


def refuse_overwrite(output: Path | None, *inputs: Path | None) -> None:
    """An output must not replace an input or anything but a regular file (exit 2)."""
    from backdoorscan._io import OutputError, check_output

    if output is None:
        return
    try:
        check_output(output, [p for p in inputs if p is not None])
    except OutputError as exc:
        raise ScanError(str(exc)) from None


@contextmanager
def errors() -> Iterator[None]:
    """Turn the library's errors into one-line messages with exit code 2.

    Every error leaves as one line, whatever raised it: a message of several lines keeps its
    first non-blank line (framework errors put the cause there), and an exception nobody
    expected is named with its type rather than shown as a traceback. Click's own exceptions
    pass through, made one line as well.
    """
    from backdoorscan.adapters.base import AdapterError
    from backdoorscan.scanner.data import DataError
    from backdoorscan.scanner.exre import ExreError
    from backdoorscan.scanner.extract import ExtractionError

    def one_line(text: str, limit: int = 500) -> str:
        # The first line, and the next ones while it ends in a colon ("cannot load X:\n why").
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
        line = lines[0] if lines else ""
        for more in lines[1:]:
            if not line.endswith(":"):
                break
            line = f"{line} {more}"
        return line if len(line) <= limit else line[: limit - 3] + "..."

    def unexpected(exc: BaseException) -> str:
        detail = one_line(str(exc))
        return (
            f"unexpected {type(exc).__name__}{': ' + detail if detail else ''} (a bug or an "
            "unusual file; please report it)"
        )

    try:
        yield
    except click.ClickException as exc:
        exc.message = one_line(exc.message)
        raise
    except (AdapterError, DataError, ExtractionError, ExreError) as exc:
        raise ScanError(one_line(str(exc))) from None
    except RuntimeError as exc:  # the model's worker failed, was stopped or timed out
        if type(exc).__module__.startswith("backdoorscan.sandbox"):
            raise ScanError(one_line(str(exc))) from None
        raise ScanError(unexpected(exc)) from None
    except MemoryError:
        raise ScanError("out of memory; lower --batch-size or scan a subset") from None
    except (OSError, ValueError) as exc:
        raise ScanError(one_line(f"{type(exc).__name__}: {exc}")) from None
    except Exception as exc:
        raise ScanError(unexpected(exc)) from None


@contextmanager
def progress_bar(enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
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


def class_progress(enabled: bool) -> Callable[[int, int], None]:
    """``update(done, total)``: one line on stderr that counts the classes analysed
    ("analysing classes 3/10"), rewritten in place; shown only when stderr is a terminal."""
    show = enabled and sys.stderr.isatty()

    def update(done: int, total: int) -> None:
        if show:
            click.echo(f"\ranalysing classes {done}/{total}", err=True, nl=done >= total)

    return update


REPORT_FORMATS = ["text", "json", "html", "sarif"]
FORMAT_HELP = (
    "Report format: text, json (schema: docs/report.schema.json), html (one self-contained "
    "file with the clusters, the suspicious samples and the trigger; needs "
    "backdoorscan[report]) or sarif (SARIF 2.1.0 for CI code scanning)."
)


def check_format(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """Fail before the scan, not after it, when HTML is asked for without matplotlib."""
    if value == "html":
        from backdoorscan.scanner.html import MissingExtraError, require_matplotlib

        try:
            require_matplotlib()
        except MissingExtraError as exc:
            raise ScanError(str(exc)) from None
    return value


def store_vocab(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    """Keep --vocab's token table for the HTML renderer (read when the report is rendered)."""
    if value is not None:
        from backdoorscan.scanner.html import load_vocab

        try:
            ctx.meta["backdoorscan.vocab"] = load_vocab(value)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ScanError(f"cannot read --vocab {value}: {exc}") from None


def render(report: Report, fmt: str) -> str:
    """The report in ``fmt``; HTML gets the vocabulary of --vocab, if given."""
    from backdoorscan.scanner.html import MissingExtraError

    ctx = click.get_current_context(silent=True)
    options = {}
    if fmt == "html" and ctx is not None and "backdoorscan.vocab" in ctx.meta:
        options["vocab"] = ctx.meta["backdoorscan.vocab"]
    try:
        with errors():
            return report.render(fmt, **options)
    except MissingExtraError as exc:
        raise ScanError(str(exc)) from None


def emit(report: Report, fmt: str, output: Path | None, quiet: bool) -> None:
    text = render(report, fmt)
    if output is not None:
        with errors():
            atomic_write_text(output, text)
        if not quiet:
            click.echo(report.to_text() if fmt != "text" else text, nl=False)
            click.echo(f"report written to {output}", err=True)
    elif not quiet or fmt != "text":
        click.echo(text, nl=False)


def build_detect_config(**kw: Any) -> Any:
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
            callback=lambda _c, _p, v: parse_clusters_option(v),
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
        click.option(
            "--min-agreement",
            type=click.FloatRange(0, 1),
            default=_D.min_agreement,
            show_default=True,
            help="A model that predicts fewer of its training labels than this share is "
            "reported as 'nothing scanned' (exit 3), never as clean.",
        ),
        click.option("--seed", type=int, default=_D.seed, show_default=True, help="Random seed."),
    ]
    return stack_options(opts, fn)


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
    return stack_options(opts, fn)


def pop_exre_config(kw: dict[str, Any]) -> Any:
    """Pop the ExRe options from ``kw``; an ExreConfig, or None when --exre was not given."""
    from backdoorscan.scanner.exre import ExreConfig

    method, threshold, epochs = kw.pop("exre"), kw.pop("exre_threshold"), kw.pop("exre_epochs")
    if method is None:
        return None
    return ExreConfig(method=method, threshold=threshold, epochs=epochs, seed=kw.get("seed", 0))


def format_option() -> Callable[..., Any]:
    """``--format``, the same for ``scan``, ``demo`` and ``report``."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(REPORT_FORMATS),
        default="text",
        show_default=True,
        callback=check_format,
        help=FORMAT_HELP,
    )


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report format, destination and verbosity."""
    opts = [
        format_option(),
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            callback=writable_output,
            help="Write the report to this file (atomically); stdout then gets the text "
            "summary only (nothing with -q).",
        ),
        vocab_option,
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."),
    ]
    return stack_options(opts, fn)


vocab_option = click.option(
    "--vocab",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    expose_value=False,
    callback=store_vocab,
    help="Token models, --format html: the vocabulary that decodes token ids (vocab.json "
    "of a tokenizer, a JSON list, or one token per line); without it the ids are shown.",
)


def report_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of ``backdoorscan report``: the format, the output and the data to draw."""
    opts = [
        format_option(),
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            callback=writable_output,
            help="Write the rendered report to this file (atomically); stdout then gets the "
            "text summary only (nothing with -q).",
        ),
        click.option(
            "--data",
            "data_path",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="--format html: the training data that was scanned (.npz, or .npy samples), "
            "to draw the suspicious samples; without it the HTML says so.",
        ),
        click.option(
            "--x-key", default="x", show_default=True, help="Array name of the samples in .npz."
        ),
        vocab_option,
        click.option("-q", "--quiet", is_flag=True, help="No summary."),
    ]
    return stack_options(opts, fn)


