"""Volume in, one label map per prompt out: the one inference path of the library.

intensity range (once per volume) -> choose slice axis and layout -> per batch of slices: copy,
normalise, resize to the model's input -> forward under ``inference_mode`` (autocast on GPU) ->
resize back (linear) -> threshold straight into the output arrays.
Every model, the CLI, the Slicer module and ``evaluate`` go through :func:`segment_volume`, so
intensity handling, resizing and laterality live here once.

Memory follows the batch, not the volume: the slices are a view of the caller's array
(:meth:`SliceLayout.to_slices`), each batch is copied and normalised on its own, and results are
written through the same view into arrays already in the volume's ``(k, j, i)`` layout. Besides the
input, a call holds the uint8 labels, the probability / uncertainty volumes only when asked, and
a few batches of float32 work.

Several prompts: a model whose image part reads no text (``shares_image_features``, e.g. SSA with
``text_fusion: late``) answers all prompts of a call in the same batches, so the image part runs
once per slice; other models run the prompts one after another on the same (cached) inputs.

Ensembles (:class:`~TextGuidedSegLib.ensemble.Ensemble`): every member runs on each batch, one after
another, and their probabilities are combined chunk by chunk at the slice's resolution, so an
ensemble holds what a single model holds (plus one batch of each member's model-resolution output).
The text-aware flip (``flip=True``) runs each batch a second time mirrored left-right, with 'left' and
'right' swapped in the words the model reads, and averages the two answers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import LoadedModel
from .ensemble import Ensemble, members_of
from .io import verdict
from .models import encode_prompts
from .orientation import SliceLayout, needs_left_right_swap, slice_layout
from .preprocessing import apply_intensity_range, intensity_range, resize_images, resize_probabilities
from .text import TextFeatures, clean_prompt, swap_left_right

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CPU_MEMORY_BUDGET = 1.5e9  # bytes of activations the automatic CPU batch size aims to stay under
INPUT_CACHE_BYTES = 256e6  # with several prompts, resized model inputs up to this size are kept for the next prompt
CHUNK_SLICES = 4  # full-resolution slices normalised / resized / thresholded together (work memory, cache size)


class SegmentationCancelled(RuntimeError):
    """Raised when the ``cancel`` event is set; no partial result is returned."""


@dataclass
class SegmentResult:
    """One prompt's result, arrays indexed ``(k, j, i)`` like the input volume.

    Args:
        prompt: the prompt as given (cleaned of extra whitespace); ``""`` for a text-free run.
        model_prompt: the words the model read (after mapping left/right to its convention).
        labels: uint8 mask, 1 where the probability >= threshold.
        probability: float32 foreground probability (when requested).
        uncertainty: float32 per-voxel uncertainty, for models that sample (else None).
        seconds: wall time of this prompt (prompts answered together share their time equally);
            slices: slices processed.
        voxels: labelled voxels (``labels.sum()``).
        confidence: mean probability of the labelled voxels (0 when there are none): how sure the
            model is of what it marked. With the default threshold 0.5 it lies in 0.5..1.
    """

    prompt: str
    model_prompt: str
    labels: np.ndarray
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    seconds: float = 0.0
    slices: int = 0
    layout: SliceLayout | None = field(default=None, repr=False)
    voxels: int = 0
    confidence: float = 0.0

    @property
    def verdict(self) -> str:
        """``found``, or ``not found`` when no voxel passed the threshold or the labelled voxels' mean
        probability is below ``io.CONFIDENCE_FOUND`` (see :func:`TextGuidedSegLib.io.verdict`)."""
        return verdict(self.voxels, self.confidence)


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an unavailable request fails clearly."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but Apple MPS is not available; use --device cpu or auto")
    return dev


def auto_batch_size(model: LoadedModel, device: torch.device) -> int:
    """Slices per forward pass that keep activation memory bounded.

    On CUDA: one probe forward measures the peak memory per slice, and the batch uses half of the
    free memory. On CPU / MPS: a fixed budget (``CPU_MEMORY_BUDGET``) over an estimate of the
    activations per slice (input pixels x 1600 bytes, measured on TMC at 160-224 px).
    """
    size = model.config.image_size
    if device.type == "cuda":
        if next(model.model.parameters()).device != device:  # probe where the slices will run
            model.model.to(device)
        free, _ = torch.cuda.mem_get_info(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        probe = torch.zeros(2, model.config.in_channels, size, size, device=device)
        text = _probe_text(model, device, 2)
        with torch.inference_mode(), _autocast(device):
            model.model(probe, text)
        per_slice = max(1, (torch.cuda.max_memory_allocated(device) - before) // 2)
        return int(max(1, min(256, 0.5 * free // per_slice)))
    per_slice = size * size * 1600
    return int(max(1, min(32, CPU_MEMORY_BUDGET // per_slice)))


def _probe_text(model: LoadedModel, device: torch.device, n: int) -> TextFeatures | None:
    if not getattr(model.model, "requires_text", True):
        return None
    return encode_prompts(model.model, model.text_encoder, ["probe"]).to(device).index([0] * n)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def validate_volume(volume: np.ndarray) -> np.ndarray:
    """A 2D image becomes a one-slice volume; non-scalar, 4D, empty or non-finite input is refused."""
    arr = np.asarray(volume)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D scalar volume (k, j, i) or a 2D image, got an array of shape {arr.shape}; "
                         "split 4D or multi-component images into scalar volumes first")
    if arr.size == 0:
        raise ValueError(f"the volume is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == bool):
        raise ValueError(f"voxel type {arr.dtype} is not supported; convert to an integer or float type")
    # min / max are NaN or infinite exactly when some voxel is: two passes without a boolean volume
    if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{bad} voxels are NaN or infinite; fix or mask them before segmenting")
    return arr


@dataclass
class _Member:
    """One network of a call (the model, or one member of an ensemble) and what it needs per volume."""

    loaded: LoadedModel
    weight: float
    samples: int  # masks drawn per slice (1 for a model that does not sample)
    swap: bool  # 'left' / 'right' swapped to reach the model's laterality convention
    lo: float  # its intensity window on this volume
    hi: float

    @property
    def size(self) -> tuple[int, int]:
        return (self.loaded.config.image_size, self.loaded.config.image_size)


def segment_volume(volume: np.ndarray, ijk_to_ras: np.ndarray, prompts: Sequence[str] | None,
                   model: LoadedModel | Ensemble, *, axis: str | int = "auto", batch_size: int | str = "auto",
                   threshold: float = 0.5, device: str | torch.device | None = None, prompt_laterality: str = "patient",
                   return_probability: bool = False, samples: int | None = None, seed: int = 0, flip: bool = False,
                   progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None) -> list[SegmentResult]:
    """Segment ``volume`` (``(k, j, i)``, or a 2D image) once per prompt.

    Args:
        ijk_to_ras: the volume's 4x4 IJK->RAS matrix (orientation decides the slice layout).
        prompts: one segment per prompt; empty or None only for text-free models.
        model: a :class:`LoadedModel` (see :func:`TextGuidedSegLib.checkpoint.load_pretrained`), or an
            :class:`~TextGuidedSegLib.ensemble.Ensemble`: every member runs on each batch (with its own
            input size, intensity window and laterality convention) and the label comes from the
            weighted mean of their probabilities; ``uncertainty`` is then the members' disagreement
            (weighted variance of their probabilities, plus a sampling member's own variance).
        axis: ``auto`` / ``axial`` / ``coronal`` / ``sagittal`` or an array axis 0, 1, 2.
        batch_size: slices per forward pass, or ``auto`` (bounded memory, see :func:`auto_batch_size`).
        threshold: probability at or above which a voxel is labelled.
        device: ``auto`` / None (CUDA, MPS, CPU), or a device name.
        prompt_laterality: ``patient`` when 'left' in the prompt means the patient's left (users),
            ``image`` when it means the image's left half (dataset reports such as QaTa's).
        return_probability: also return the float32 probability volume.
        samples: for models that sample masks (SVP-CVAE): how many (None = the model's default,
            1 = the single most likely mask, no uncertainty). The label comes from the mean
            probability; ``uncertainty`` is the per-voxel variance of the sampled probabilities.
            Models that do not sample refuse ``samples > 1`` (an ensemble: when no member samples).
        seed: seeds the sampling (same seed, same samples; each prompt starts from it).
        flip: text-aware test-time flip. Each slice is also segmented mirrored left-right, with 'left'
            and 'right' swapped in the words the model reads (the mirror swaps the patient's sides on
            the picture), and that answer, mirrored back, is averaged with the direct one (a model
            that samples draws its samples on both views). Sagittal slices have no left-right axis:
            mirrored, they would put the face behind the head, so they are not flipped (a warning
            says so) and ``flip`` changes nothing there.
        progress: called as ``progress(done, total)`` after every batch (total = prompts x slices).
        cancel: when set, the run stops after the current batch (of an ensemble: the current
            member's forward pass) and raises :class:`SegmentationCancelled`.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    arr = validate_volume(volume)
    prompts = [p for p in (prompts or [])]
    if not prompts:
        if model.requires_text:
            raise ValueError(f"model '{model.name}' needs a text prompt (it has no text-free mode)")
        cleaned: list[str | None] = [None]
    else:
        cleaned = [clean_prompt(p) for p in prompts]

    if samples is not None and int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples is not None and int(samples) > 1 and not model.samples_masks:
        raise ValueError(f"model '{model.name}' gives one mask per prompt; --samples needs a model that samples "
                         "masks (SVP-CVAE)")

    dev = select_device(device)
    layout = slice_layout(ijk_to_ras, arr.shape, axis)
    mirror = bool(flip) and layout.columns_right_to_left
    if flip and not mirror:
        logger.warning("no test-time flip on %s slices: they have no left-right axis (mirrored, they would put "
                       "the face behind the head)", layout.plane)
    members: list[_Member] = []
    windows: dict[str, tuple[float, float]] = {}  # intensity window per intensity config (members often share one)
    for loaded, weight in members_of(model):
        net = loaded.model
        if next(net.parameters()).device != dev:
            net.to(dev)
        net.eval()
        n_samples = ((int(samples) if samples is not None else int(getattr(loaded.config, "samples", 1)))
                     if loaded.samples_masks else 1)
        key = repr(loaded.config.intensity)
        if key not in windows:  # sampled percentiles on large volumes, see preprocessing
            windows[key] = intensity_range(arr, loaded.config.intensity)
        members.append(_Member(loaded, weight, n_samples,
                               needs_left_right_swap(layout, loaded.config.laterality, prompt_laterality),
                               *windows[key]))
    slices = layout.to_slices(arr)  # a view: each batch is copied when it is needed
    n, rows, cols = slices.shape
    # A single slice is a picture (a chest X-ray, an endoscopy frame): its rows read top to bottom
    # like a coronal view, whatever plane its (usually missing) geometry names.
    plane = "coronal" if n == 1 else layout.plane
    # each slice decodes n_samples masks: keep the automatic batch's memory the same; an ensemble's
    # members run one after another on a batch, so the one with the largest activations decides
    bs = (min(max(1, auto_batch_size(m.loaded, dev) // m.samples) for m in members) if batch_size == "auto"
          else int(batch_size))
    if bs < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    total = n * len(cleaned)
    done = 0
    # uncertainty: the spread of sampled masks, and of an ensemble's members
    uncertain = len(members) > 1 or any(m.samples > 1 for m in members)
    logger.debug("segmenting %d %s slices of %dx%d with %s, batch %d on %s%s", n, layout.plane, rows, cols,
                 model.name, bs, dev, " (and mirrored)" if mirror else "")

    def model_input(m: _Member, s0: int) -> torch.Tensor:
        """Batch ``[s0, s0 + bs)`` as member ``m`` reads it: normalised, resized, channels repeated.

        Full-resolution float32 copies exist for ``CHUNK_SLICES`` slices at a time only.
        """
        stop = min(s0 + bs, n)
        parts = []
        for c0 in range(s0, stop, CHUNK_SLICES):
            chunk = apply_intensity_range(slices[c0:min(c0 + CHUNK_SLICES, stop)], m.lo, m.hi)  # a float32 copy
            parts.append(resize_images(torch.from_numpy(chunk)[:, None].to(dev), m.size))  # one channel
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        return x.expand(-1, 3, -1, -1) if m.loaded.config.in_channels == 3 else x

    def probabilities(m: _Member, x: torch.Tensor, text, mirrored_text,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Member ``m``'s mean probability ``[b * g, 1, h, w]`` on batch ``x`` (and its variance over the
        sampled masks, for a model that samples); with the flip, the mirrored view's answer joins it."""
        net = m.loaded.model
        with torch.inference_mode(), _autocast(dev):
            def draw(image: torch.Tensor, words) -> torch.Tensor:  # [S, b * g, 1, h, w]
                if m.samples > 1:
                    return net.sample(image, words, m.samples, generator=generator).float()
                return torch.sigmoid(net(image, words)["logits"].float())[None]

            stack = draw(x, text)
            if mirror:
                stack = torch.cat([stack, draw(x.flip(-1), mirrored_text).flip(-1)])
            mean = stack[0] if stack.shape[0] == 1 else stack.mean(0)
            variance = stack.var(0, unbiased=False) if m.samples > 1 else None
        return mean, variance

    def write_back(means: list, variances: list, j: int, s0: int, out: np.ndarray | None,
                   labels_out: np.ndarray, answer: list, spread_out: np.ndarray | None) -> None:
        """Prompt ``j`` of a batch: the members' ``[b, g, 1, h, w]`` model-resolution means (and
        variances, or None) resized to the slices, combined with the members' weights, and written
        into the slice-layout views ``out[s0:s0 + b]`` (when given), ``labels_out`` (thresholded; the
        labelled voxels and the sum of their probabilities are added to ``answer``) and
        ``spread_out`` (uncertainty, when given)."""
        for c0 in range(0, means[0].shape[0], CHUNK_SLICES):
            def full_size(small: torch.Tensor) -> torch.Tensor:
                return resize_probabilities(small[c0:c0 + CHUNK_SLICES, j], (rows, cols))[:, 0]

            fulls = [full_size(mean) for mean in means]
            spread = None
            if len(members) == 1:
                probability = fulls[0]
                if spread_out is not None:
                    spread = full_size(variances[0])
            else:  # weighted mean; spread = weighted variance of the members + their own (law of total variance)
                probability = sum(m.weight * f for m, f in zip(members, fulls))
                if spread_out is not None:
                    spread = sum(m.weight * ((f - probability) ** 2 + (full_size(v) if v is not None else 0.0))
                                 for m, f, v in zip(members, fulls, variances))
            full = probability.cpu().numpy()
            t0, t1 = s0 + c0, s0 + c0 + full.shape[0]
            above = labels_out[t0:t1].view(np.bool_)  # the uint8 labels themselves, as 0 / 1 bytes
            np.greater_equal(full, threshold, out=above)
            # labelled voxels and the sum of their probabilities: a float32 dot product of the
            # probabilities with the 0 / 1 mask (BLAS, about half the time of multiplying into a
            # buffer and summing that in float64; a boolean gather, full[above], costs more still)
            answer[0] += int(np.count_nonzero(above))
            answer[1] += float(np.dot(full.reshape(-1), above.astype(np.float32, order="C").reshape(-1)))
            if out is not None:
                out[t0:t1] = full
            if spread_out is not None:
                spread_out[t0:t1] = spread.cpu().numpy()

    # Prompts answered together: a model whose image part reads no text (``shares_image_features``)
    # answers every prompt of a batch in one forward pass, the image part once; other models take
    # one prompt at a time (an ensemble answers them together when every member can).
    shared = len(cleaned) > 1 and all(
        m.samples == 1 and bool(getattr(m.loaded.model, "shares_image_features", False)) for m in members)
    groups = [list(range(len(cleaned)))] if shared else [[i] for i in range(len(cleaned))]
    # The model input does not depend on the prompt: when prompts run one after another it is kept
    # for the next one when it is small (it is at the model's resolution).
    keep_inputs = len(groups) > 1 and n * sum(m.size[0] * m.size[1] for m in members) * 4 <= INPUT_CACHE_BYTES
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def encode(m: _Member, words: list) -> object:
        return encode_prompts(m.loaded.model, m.loaded.text_encoder, words, plane=plane).to(dev)

    results = []
    for group_index, group in enumerate(groups):
        start = time.perf_counter()
        g = len(group)
        answers = [[0, 0.0] for _ in group]  # per prompt: labelled voxels, sum of their probabilities
        # per member: the words it reads (its laterality convention), their features, and the
        # mirrored view's (left / right swapped once more)
        words = [[swap_left_right(cleaned[i]) if (cleaned[i] and m.swap) else cleaned[i] for i in group]
                 for m in members]
        texts, mirrored_texts = [], []
        for m, w in zip(members, words):
            text = encode(m, w) if w[0] is not None else None
            mirrored = text
            if mirror and text is not None:
                swapped = [swap_left_right(p) for p in w]
                mirrored = text if swapped == w else encode(m, swapped)
            texts.append(text)
            mirrored_texts.append(mirrored)
        # outputs in the volume's own (k, j, i) layout, filled through views in the slice layout
        labels = [np.empty(arr.shape, dtype=np.uint8) for _ in group]
        prob = [np.empty(arr.shape, dtype=np.float32) if return_probability else None for _ in group]
        spread = [np.empty(arr.shape, dtype=np.float32) if uncertain else None for _ in group]
        label_slices = [layout.to_slices(a) for a in labels]
        prob_slices = [layout.to_slices(a) if a is not None else None for a in prob]
        spread_slices = [layout.to_slices(a) if a is not None else None for a in spread]
        generators = [torch.Generator(device=dev).manual_seed(int(seed)) if m.samples > 1 else None for m in members]
        for s0 in range(0, n, bs):
            means, variances = [], []
            for index, m in enumerate(members):
                if cancel is not None and cancel.is_set():
                    raise SegmentationCancelled("segmentation cancelled; nothing was written")
                x = inputs.pop((index, s0), None) if keep_inputs else None
                if x is None:
                    x = model_input(m, s0)
                if keep_inputs and group_index < len(groups) - 1:
                    inputs[(index, s0)] = x
                b = x.shape[0]
                # image t answers prompts t*g .. t*g+g-1 (the models' convention for a text batch of g x b)
                order = [j for _ in range(b) for j in range(g)]
                text = texts[index].index(order) if texts[index] is not None else None
                mirrored = mirrored_texts[index].index(order) if mirrored_texts[index] is not None else None
                mean, variance = probabilities(m, x, text, mirrored, generators[index])
                means.append(mean.view(b, g, *mean.shape[1:]))
                variances.append(variance.view(b, g, *variance.shape[1:]) if variance is not None else None)
                del x, mean, variance
            for j in range(g):
                write_back(means, variances, j, s0, prob_slices[j], label_slices[j], answers[j], spread_slices[j])
            b = means[0].shape[0]
            del means, variances  # nothing of this batch outlives it (the next forward pass is the memory peak)
            done += b * g
            if progress is not None:
                progress(done, total)
        if cancel is not None and cancel.is_set():
            raise SegmentationCancelled("segmentation cancelled; nothing was written")
        seconds = (time.perf_counter() - start) / g  # prompts answered together share the time
        for j, i in enumerate(group):
            voxels, mass = answers[j]
            read = list(dict.fromkeys(w[j] or "" for w in words))  # an ensemble's members may read other words
            results.append(SegmentResult(
                prompt=cleaned[i] or "", model_prompt=" | ".join(read), labels=labels[j], probability=prob[j],
                uncertainty=spread[j], seconds=seconds, slices=n, layout=layout, voxels=voxels,
                confidence=mass / voxels if voxels else 0.0))
    return results
