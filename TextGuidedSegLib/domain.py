"""What each model is for, and a check that an input is of that kind before anything is written.

A model's domain (``domain.json`` in its folder) says what it was trained on: modality, 2D pictures
or 3D volumes, body region, what its prompts talk about, and whether its training pictures were grey
or colour. :func:`check_input` compares an input with it in two ways:

- **metadata rules**: a many-slice volume given to a model of single pictures (or the reverse), CT
  Hounsfield values (air at -1000) given to a model that never saw CT, a colour picture given to a
  model of grey X-rays;
- **a learned score that ignores metadata**: each slice, laid out as the engine shows it to the
  model and contrast-normalised, is reduced to a 24 x 24 thumbnail and described by 135 numbers
  (an 8 x 8 thumbnail, gradient-orientation histograms in 3 x 3 cells, an intensity histogram and
  the left-right asymmetry); their Mahalanobis distance to those of the training set (standardised,
  PCA with :data:`COMPONENTS` components plus the residual off that subspace, ``domain.safetensors``)
  is compared with a threshold set at the 99th percentile of the validation split (about 1 % false
  alarms there). A volume's score is the median of its slices'. (The thumbnail alone caught 19 %
  of Kvasir frames as foreign to the chest X-ray model; with the gradient and intensity histograms
  92 %: measured with ``Training/calibrate_domain.py``.)

The thumbnail is model-independent on purpose: it works the same for every architecture, and it
needs only numpy, so the Slicer panel can run the check on its main thread before it starts the
inference process (no torch there). ``Training/calibrate_domain.py`` fits it and measures false
alarms and detections; the figures are stored in ``domain.json`` and quoted in the README.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .orientation import slice_layout

logger = logging.getLogger(__name__)

DOMAIN_JSON = "domain.json"
DOMAIN_STATS = "domain.safetensors"
THUMBNAIL = 24
COMPONENTS = 8
#: Gradient-orientation histograms: CELLS x CELLS cells of the thumbnail, ORIENTATIONS bins each.
CELLS = 3
ORIENTATIONS = 6
#: Intensity histogram bins of the contrast-normalised thumbnail.
HISTOGRAM_BINS = 16
#: Slices of a volume scored (evenly spaced): enough for a stable median, cheap on the main thread.
MAX_SCORED_SLICES = 16
#: Share of voxels at or below -500 that marks CT Hounsfield units (air is -1000; MR, X-ray and
#: endoscopy intensities are not negative).
CT_AIR_FRACTION = 0.01
MODALITIES = ("X-ray", "endoscopy", "CT", "MR")


@dataclass
class ModelDomain:
    """What a model was trained on (``domain.json``).

    Args:
        modality: one of :data:`MODALITIES`.
        dimensionality: ``2D`` (single pictures) or ``3D`` (volumes, segmented slice by slice).
        body_region: e.g. ``chest``, ``colon``, ``brain``.
        prompts: what its prompts talk about, in words.
        colour: ``grey`` or ``RGB``: the training pictures as stored (the model always reads grey).
        training_data: dataset and split the statistics come from.
        threshold: learned-score threshold (99th percentile of the validation split).
        calibration: measured figures (false-alarm rate on validation, detection rates elsewhere).
    """

    modality: str
    dimensionality: str
    body_region: str
    prompts: str
    colour: str = "grey"
    training_data: str = ""
    threshold: float | None = None
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        if self.dimensionality not in ("2D", "3D"):
            raise ValueError(f"dimensionality must be '2D' or '3D', got {self.dimensionality!r}")
        if self.colour not in ("grey", "RGB"):
            raise ValueError(f"colour must be 'grey' or 'RGB', got {self.colour!r}")

    def summary(self) -> str:
        """One line: 'chest X-ray, 2D pictures; prompts: ...'."""
        kind = "2D pictures" if self.dimensionality == "2D" else "3D volumes"
        return f"{self.body_region} {self.modality}, {kind}; prompts: {self.prompts}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DomainStatistics:
    """The training descriptors' statistics: per-feature mean and scale (standardisation), then a PCA of
    the standardised descriptors: components ``[K, D]``, their variances ``[K]``, and the mean
    variance left off the subspace (per dimension)."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float

    @classmethod
    def fit(cls, descriptors: np.ndarray, components: int = COMPONENTS) -> "DomainStatistics":
        x = np.asarray(descriptors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] <= components or x.shape[1] <= components:
            raise ValueError(f"need more than {components} descriptors [N, D] with D > {components} to fit, "
                             f"got shape {x.shape}")
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / scale
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        variances = s ** 2 / (x.shape[0] - 1)
        residual = variances[components:].sum() / (x.shape[1] - components)
        return cls(mean.astype(np.float32), scale.astype(np.float32), vt[:components].astype(np.float32),
                   np.maximum(variances[:components], 1e-12).astype(np.float32), float(max(residual, 1e-12)))

    def score(self, descriptors: np.ndarray) -> np.ndarray:
        """Distance of each descriptor to the training set, on the scale the threshold is set on:
        sqrt((Mahalanobis^2 in the subspace + residual^2 / residual variance) / D)."""
        x = (np.asarray(descriptors, dtype=np.float64) - self.mean) / self.scale
        basis = self.components.astype(np.float64)
        z = x @ basis.T
        inside = (z ** 2 / self.variances).sum(1)
        residual = ((x - z @ basis) ** 2).sum(1) / self.residual_variance
        return np.sqrt((inside + residual) / x.shape[1])

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"mean": self.mean, "scale": self.scale, "components": self.components,
                   "variances": self.variances, "residual_variance": np.array([self.residual_variance], np.float32)},
                  str(path))

    @classmethod
    def load(cls, path: Path) -> "DomainStatistics":
        from safetensors.numpy import load_file

        t = load_file(str(path))
        return cls(t["mean"], t["scale"], t["components"], t["variances"], float(t["residual_variance"][0]))


def _block_means(a: np.ndarray, axis: int) -> np.ndarray:
    """Average ``a`` over THUMBNAIL equal blocks along ``axis`` (a block of an axis shorter than
    THUMBNAIL is its nearest pixel)."""
    n = a.shape[axis]
    starts = np.minimum(np.linspace(0, n, THUMBNAIL + 1).astype(int)[:-1], n - 1)
    sums = np.add.reduceat(a, starts, axis=axis)
    counts = np.diff(np.append(starts, n))
    counts = np.where(counts > 0, counts, 1).astype(np.float32)  # reduceat gives the pixel itself there
    shape = [1, 1]
    shape[axis] = THUMBNAIL
    return sums / counts.reshape(shape)


def _thumbnail(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (0.5, 99.5))
    scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(image)
    return _block_means(_block_means(scaled.astype(np.float32), 0), 1)


def describe_thumbnail(thumb: np.ndarray) -> np.ndarray:
    """135 numbers of a THUMBNAIL x THUMBNAIL slice in 0..1: its 8 x 8 block means, gradient-orientation
    histograms (CELLS x CELLS cells, ORIENTATIONS bins, magnitude-weighted, each cell normalised), an
    intensity histogram (HISTOGRAM_BINS bins) and its mean left-right asymmetry."""
    t = np.asarray(thumb, dtype=np.float32)
    small = t.reshape(8, THUMBNAIL // 8, 8, THUMBNAIL // 8).mean((1, 3)).ravel()
    gy = np.diff(t, axis=0)[:, :-1]
    gx = np.diff(t, axis=1)[:-1, :]
    magnitude = np.sqrt(gx ** 2 + gy ** 2)
    bins = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * ORIENTATIONS).astype(int), ORIENTATIONS - 1)
    cell = (THUMBNAIL - 1) // CELLS
    orientation = []
    for cy in range(CELLS):
        for cx in range(CELLS):
            m = magnitude[cy * cell:(cy + 1) * cell, cx * cell:(cx + 1) * cell].ravel()
            b = bins[cy * cell:(cy + 1) * cell, cx * cell:(cx + 1) * cell].ravel()
            h = np.bincount(b, weights=m, minlength=ORIENTATIONS).astype(np.float32)
            orientation.append(h / (h.sum() + 1e-6))
    histogram = np.histogram(t, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0].astype(np.float32) / t.size
    asymmetry = np.array([np.abs(t - t[:, ::-1]).mean()], dtype=np.float32)
    return np.concatenate([small, *orientation, histogram, asymmetry]).astype(np.float32)


def describe_slices(volume: np.ndarray, ijk_to_ras: np.ndarray, axis: str | int = "auto",
                    max_slices: int = MAX_SCORED_SLICES) -> np.ndarray:
    """``[n, 135]`` descriptors (:func:`describe_thumbnail`) of up to ``max_slices`` evenly spaced slices,
    laid out as the engine lays them out for a model, each contrast-normalised (0.5 / 99.5
    percentiles -> 0..1) and area-averaged to THUMBNAIL x THUMBNAIL first."""
    arr = np.asarray(volume)
    if arr.ndim == 2:
        arr = arr[None]
    layout = slice_layout(np.asarray(ijk_to_ras, dtype=np.float64), arr.shape, axis)
    slices = layout.to_slices(arr)
    n = slices.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
    return np.stack([describe_thumbnail(_thumbnail(np.asarray(slices[i], dtype=np.float32))) for i in picks])


@dataclass
class DomainCheck:
    """What :func:`check_input` found. ``problems`` is empty when the input looks in-domain."""

    model: str
    domain: ModelDomain
    problems: list = field(default_factory=list)
    score: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self, fits: Sequence[str] = (), hint: str = "Nothing was written; use --force to segment anyway"
                ) -> str:
        """One line for the user: the model's domain, what looked wrong, which installed model fits."""
        fit = (f"; installed models that fit this input: {', '.join(fits)}" if fits
               else "; no installed model fits this input")
        return f"model '{self.model}' is for {self.domain.summary()}, but {'; '.join(self.problems)}{fit}. {hint}"


def read_domain(model_dir: str | Path) -> tuple[ModelDomain, DomainStatistics | None] | None:
    """The domain of the model in ``model_dir`` (None when it has no ``domain.json``)."""
    folder = Path(model_dir)
    path = folder / DOMAIN_JSON
    if not path.is_file():
        return None
    domain = ModelDomain(**json.loads(path.read_text(encoding="utf-8")))
    stats = DomainStatistics.load(folder / DOMAIN_STATS) if (folder / DOMAIN_STATS).is_file() else None
    return domain, stats


def write_domain(model_dir: str | Path, domain: ModelDomain, stats: DomainStatistics | None) -> None:
    folder = Path(model_dir)
    (folder / DOMAIN_JSON).write_text(json.dumps(domain.to_dict(), indent=2) + "\n", encoding="utf-8")
    if stats is not None:
        stats.save(folder / DOMAIN_STATS)


def metadata_problems(domain: ModelDomain, volume: np.ndarray, *, colour: bool = False) -> list:
    """What the input's shape, values and colour say against ``domain``, in words."""
    arr = np.asarray(volume)
    shape = arr.shape if arr.ndim == 3 else (1,) + arr.shape
    problems = []
    slices_min = min(shape)
    if domain.dimensionality == "2D" and slices_min > 1:
        problems.append(f"the input is a 3D volume ({' x '.join(map(str, shape))} voxels), not a single picture")
    if domain.dimensionality == "3D" and slices_min == 1:
        problems.append(f"the input is a single 2D picture ({shape[1]} x {shape[2]} pixels), not a volume")
    if domain.modality != "CT" and (np.issubdtype(arr.dtype, np.signedinteger)
                                    or np.issubdtype(arr.dtype, np.floating)):
        sample = arr.ravel()[:: max(1, arr.size // 200000)]
        air = float((sample <= -500).mean())
        if air >= CT_AIR_FRACTION:
            problems.append(f"its intensities look like CT Hounsfield units ({100 * air:.0f} % of voxels at or "
                            f"below -500, minimum {float(sample.min()):.0f})")
    if colour and domain.colour == "grey":
        problems.append(f"it is a colour picture, and the model was trained on grey {domain.modality} images")
    return problems


def check_input(model_name: str, model_dir: str | Path, volume: np.ndarray, ijk_to_ras: np.ndarray, *,
                colour: bool = False, axis: str | int = "auto",
                descriptors: np.ndarray | None = None) -> DomainCheck | None:
    """Check an input against the domain of the model in ``model_dir`` (None: the model states none).
    ``descriptors``: the input's :func:`describe_slices`, when already computed (they do not depend on
    the model)."""
    found = read_domain(model_dir)
    if found is None:
        return None
    domain, stats = found
    check = DomainCheck(model_name, domain, metadata_problems(domain, volume, colour=colour))
    if stats is not None and domain.threshold is not None:
        if descriptors is None:
            descriptors = describe_slices(volume, ijk_to_ras, axis)
        check.score = float(np.median(stats.score(descriptors)))
        if check.score > domain.threshold:
            check.problems.append(f"it looks unlike the model's training images (score {check.score:.2f}, "
                                  f"threshold {domain.threshold:.2f}, set so that 1 % of validation images "
                                  "exceed it)")
    return check


def fitting_models(entries: Iterable, volume: np.ndarray, ijk_to_ras: np.ndarray, *, colour: bool = False,
                   exclude: str = "") -> list:
    """Names of the installed models (``model_store.ModelEntry`` s) whose domain accepts this input."""
    names = []
    descriptors = describe_slices(volume, ijk_to_ras)  # the same for every model: computed once
    for entry in entries:
        if entry.path is None or entry.name == exclude:
            continue
        try:
            check = check_input(entry.name, entry.path, volume, ijk_to_ras, colour=colour, descriptors=descriptors)
        except (OSError, ValueError) as exc:  # a broken domain file must not hide the real message
            logger.warning("domain of %s unreadable: %s", entry.name, exc)
            continue
        if check is not None and check.ok:
            names.append(entry.name)
    return names
