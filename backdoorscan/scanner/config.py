"""The detector's parameters, in one place (light to import: the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    fallback_rule: tuple[str, ...] = ("size", "separation")
    refine: bool = True
    max_share: float = 0.6
    n_jobs: int = 0  # threads for the model and the classes (0: every core)
    seed: int = 0

    def __post_init__(self) -> None:
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
