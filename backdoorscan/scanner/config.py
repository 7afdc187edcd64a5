"""The settings of a scan, in one place (light to import: the CLI reads its defaults here).

:class:`DetectConfig` holds what decides the verdict (it is written into the report);
:class:`RunOptions` how the model runs and the data is read (device, batch size, memory,
normalisation); :class:`ModelOptions` how an adapter loads a model file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

REDUCTIONS = ("pca", "ica", "none")
ANALYSES = ("size", "separation", "silhouette", "distance", "transfer")


@dataclass
class DetectConfig:
    """Every parameter of the detector, in one place; ``seed`` drives every random choice."""

    reduce: str = "pca+ica"
    n_components: int = 10
    n_clusters: int | str | tuple[int, ...] = (2, 3)
    max_clusters: int = 5
    n_init: int = 10
    fit_samples: int = 2000  # FastICA and k-means learn from at most this many per class
    size_threshold: float = 0.35
    separation_threshold: float = 5.0
    silhouette_threshold: float = 0.25
    rule: tuple[str, ...] = ("transfer",)
    min_class_size: int = 20
    silhouette_max_exact: int = 2000
    ica_max_iter: int = 200
    transfer_threshold: float = 0.5
    transfer_samples: int = 300
    transfer_screen: int = 10  # stamped samples per class in the first look (0: none)
    transfer_queries: int = 100
    transfer_neighbors: int = 10
    transfer_reference: int = 8192  # inputs searched for neighbours (0: all)
    # Calibrate the transfer test per model (scanner/calibrate.py): a trigger must also send
    # ``transfer_effect`` more of its source class to the label than the genuine difference
    # between the two classes does at the trigger's size (p <= 0.01). Off by default: on the
    # attack suite (benchmarks/RESULTS.md) it cleared the tuning twins' false alarms but, on
    # the held-out scenarios, lost a blend and a SIG and kept a twin's false alarm.
    transfer_null: bool = False
    transfer_effect: float = 0.4
    fallback_rule: tuple[str, ...] = ("size", "separation")
    refine: bool = True
    max_share: float = 0.6
    # A scan whose model predicts fewer than this share of its training labels means nothing:
    # it is reported as "nothing scanned" (exit 3), never as clean.
    min_agreement: float = 0.5
    n_jobs: int = 0  # threads for the model and the classes (0: every core)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rule", "fallback_rule"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = value.split(",")
            setattr(self, name, tuple(v.strip() for v in value if v.strip()))
        if not self.reductions or set(self.reductions) - set(REDUCTIONS):
            raise ValueError(
                f"reduce must be one of {', '.join(REDUCTIONS)} or several joined by '+', "
                f"not {self.reduce!r}"
            )
        self.n_clusters = parse_clusters(self.n_clusters)
        if self.n_components < 1:
            raise ValueError("n_components must be at least 1")
        if 0 < self.fit_samples < 20:
            raise ValueError("fit_samples must be 0 (every sample) or at least 20")
        if not 0 < self.size_threshold < 1:
            raise ValueError("size_threshold must lie between 0 and 1")
        for name in ("rule", "fallback_rule"):
            rule = getattr(self, name)
            if not rule or set(rule) - set(ANALYSES):
                raise ValueError(f"{name} must name analyses among {', '.join(ANALYSES)}")
        if "transfer" in self.fallback_rule:
            raise ValueError("fallback_rule is used without the model, so not with transfer")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("min_agreement must lie between 0 and 1")

    @property
    def reductions(self) -> tuple[str, ...]:
        """The reductions to cluster in, from ``reduce`` (e.g. ``pca+ica``)."""
        return tuple(r for r in self.reduce.split("+") if r)

    def as_dict(self) -> dict[str, Any]:
        """Settings for the report."""
        out = asdict(self)
        out["rule"] = list(self.rule)
        out["fallback_rule"] = list(self.fallback_rule)
        if isinstance(self.n_clusters, tuple):
            out["n_clusters"] = list(self.n_clusters)
        return out


def parse_clusters(value: int | str | tuple[int, ...] | list[int]) -> int | str | tuple[int, ...]:
    """``2``, ``"2,3"``, ``(2, 3)`` or ``"auto"``; every k must be at least 2."""
    if value == "auto":
        return "auto"
    given = value
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"n_clusters must be integers >= 2 or 'auto', not {value!r}") from None
    ks = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    if not ks or min(ks) < 2:
        raise ValueError(f"n_clusters must be integers >= 2 or 'auto', not {given!r}")
    return ks[0] if len(ks) == 1 else tuple(sorted(set(ks)))


@dataclass
class RunOptions:
    """How the model runs and the data is read: built once (by the CLI or :func:`scan`) and
    passed down; none of it changes the verdict.

    ``max_memory`` (bytes; None: the machine's memory) bounds the scan's arrays; ``scale``,
    ``mean``, ``std`` normalise float inputs per batch; ``x_key``, ``y_key`` name the arrays
    of an ``.npz`` data file; ``timeout`` bounds each request to the model's worker process and
    ``trust_model`` loads a model file in this process instead (see ``SECURITY.md``).
    """

    device: str = "auto"
    batch_size: int = 256
    max_memory: int | None = None
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    x_key: str = "x"
    y_key: str = "y"
    # A model FILE is untrusted: it is loaded and run in a confined worker process (memory
    # bounded by max_memory, each request by timeout seconds) unless trust_model says it may
    # be loaded in this process (needed to retrain a format that runs its own code).
    timeout: float | None = 600.0
    trust_model: bool = False
    # Where the extraction runs: "local" (this process) or "ray" (Ray Data actors, see
    # scanner/ray_engine.py); ray_address: a Ray cluster ("auto", "ray://host:10001"), None
    # for a local instance on this machine's cores; ray_concurrency: extraction actors (None:
    # one per CPU Ray offers, at most one per batch); ray_spill_dir: where the extraction's
    # outputs are spilled (None: the temporary folder; a cluster needs a path every node sees)
    # when they are at least ray_spill_above bytes (0: always, None: never).
    engine: str = "local"
    ray_address: str | None = None
    ray_concurrency: int | None = None
    # Tables (CSV, JSON Lines, Parquet) and image folders (scanner/published.py): the columns
    # of the texts (or image paths) and labels, the image side (None: the model folder's
    # preprocessing, else the model's input) and the longest token sequence (None: the model's).
    text_column: str = "text"
    label_column: str = "label"
    image_size: int | None = None
    max_length: int | None = None
    ray_spill_dir: str | None = None
    ray_spill_above: int | None = 1 << 30

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be local or ray, not {self.engine!r}")
        if self.engine != "ray" and self.ray_address is not None:
            raise ValueError("ray_address applies to engine='ray' only")
        if self.ray_concurrency is not None and self.ray_concurrency < 1:
            raise ValueError("ray_concurrency must be at least 1 (or None)")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive (or None: no limit)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        for name in ("image_size", "max_length"):
            if getattr(self, name) is not None and not 1 <= getattr(self, name) <= 1 << 16:
                raise ValueError(f"{name} must lie between 1 and 65536")

    @property
    def normalisation(self) -> dict[str, Any]:
        """``scale``, ``mean`` and ``std`` as keyword arguments of ``conform``."""
        return {"scale": self.scale, "mean": self.mean, "std": self.std}


@dataclass
class ModelOptions:
    """How an adapter loads a model: the ``layer`` to cluster, and for PyTorch state dicts the
    architecture (``arch`` as ``module:callable``, ``arch_kwargs``) and per-sample
    ``input_shape``; ``input_dtype`` (``float32`` or ``int64``) for formats that do not
    record their input."""

    layer: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None

    def loader_kwargs(self) -> dict[str, Any]:
        """The options the adapters' loaders take (those that were given)."""
        out: dict[str, Any] = {}
        if self.arch:
            out["arch"] = self.arch
        if self.arch_kwargs:
            out["arch_kwargs"] = dict(self.arch_kwargs)
        if self.input_shape is not None:
            out["input_shape"] = tuple(self.input_shape)
        if self.input_dtype is not None:
            out["input_dtype"] = self.input_dtype
        return out


def split_settings(
    caller: str,
    settings: dict[str, Any],
    run: RunOptions | None = None,
    model: ModelOptions | None = None,
    config: DetectConfig | None = None,
) -> tuple[RunOptions, ModelOptions, DetectConfig]:
    """Sort keyword settings into the three settings objects, on top of those given.

    A name that none of them has raises ``TypeError``, as Python does for an unknown keyword:
    a misspelt setting must not be ignored silently.
    """
    groups: list[tuple[Any, Any]] = [
        (RunOptions, run or RunOptions()),
        (ModelOptions, model or ModelOptions()),
        (DetectConfig, config or DetectConfig()),
    ]
    known = {f.name: i for i, (cls, _) in enumerate(groups) for f in fields(cls)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    out = []
    for i, (cls, base) in enumerate(groups):
        mine = {k: v for k, v in settings.items() if known[k] == i}
        if not mine:
            out.append(base)
            continue
        merged = {f.name: getattr(base, f.name) for f in fields(cls)} | mine
        out.append(cls(**merged))
    return out[0], out[1], out[2]
