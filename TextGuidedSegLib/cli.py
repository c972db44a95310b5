"""``textguidedseg``: predict, evaluate, models.

    textguidedseg predict IMAGE_OR_DIR [...] --prompt "lower left lung infection" --output out/
    textguidedseg evaluate --dataset qata --data-root ../shared/data/qata --split val
    textguidedseg evaluate --dataset qata --data-root ../shared/data/qata --model qata-ensemble-cpu --flip
    textguidedseg evaluate --dataset msd --data-root ../shared/data/volumes/msd_hippocampus --split val \
        --model hippocampus-mr-cpu --save-predictions preds/
    textguidedseg models list | info NAME | import PATH [--name NAME] | download NAME

Every error a user can cause (missing file, empty prompt, NaN voxels, unknown model, ...) ends in a
one-line message and exit status 2, with no partial output file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__

logger = logging.getLogger("textguidedseg")

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp",
                   ".tif", ".tiff")
SEG_SUFFIX = ".seg.nrrd"


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def collect_inputs(items: Sequence[str]) -> list[Path]:
    """Files, directories (every image file inside, or one DICOM series) and ``@list.txt`` files."""
    paths: list[Path] = []
    for item in items:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise UserError(f"list file {listing} not found")
            paths += [Path(line.strip()) for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES))
            if files:
                paths += files
            elif any(f.suffix.lower() == ".dcm" or f.suffix == "" for f in p.iterdir() if f.is_file()):
                paths.append(p)  # a DICOM series
            else:
                raise UserError(f"directory {p} holds no image files ({', '.join(VOLUME_SUFFIXES)}) or DICOM series")
        else:
            paths.append(p)
    for p in paths:
        if not p.exists():
            raise UserError(f"input {p} not found")
    return paths


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    """Refuse empty prompts before anything is loaded (the engine cleans and truncates the rest)."""
    for i, prompt in enumerate(prompts, 1):
        if not prompt or not prompt.strip():
            raise UserError(f"--prompt number {i} is an empty prompt: type what to segment, e.g. 'lung infection'")
    return list(prompts)


def _check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise UserError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    return threshold


def cmd_predict(args: argparse.Namespace) -> int:
    from .model_store import list_models, resolve_model

    # Cheap checks first: nothing is loaded or written until they pass.
    prompts = _check_prompts(args.prompt or [])
    _check_threshold(args.threshold)
    inputs = collect_inputs(args.inputs)
    shard, shards = parse_shard(args.shard)
    inputs = inputs[shard::shards]
    if not inputs:
        raise UserError("no inputs in this shard")
    entry = resolve_model(args.model)
    if not prompts and not entry.text_free:
        raise UserError(f"model '{entry.name}' needs --prompt (it has no text-free mode)")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file, not a folder")
    targets = {path: out_dir / f"{_stem(path)}{SEG_SUFFIX}" for path in inputs}
    existing = [t for t in targets.values() if t.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists ({len(existing)} of the outputs do); pass --overwrite to "
                        "replace them, or choose another --output")

    from tqdm import tqdm

    from .domain import check_input, fitting_models
    from .engine import segment_volume, select_device
    from .io import ImageReadError, SegmentSpec, read_volume, write_labelmap, write_segmentation, write_volume
    from .model_store import domain_folder, load_model
    from .terminology import style_for, unique_names

    device = select_device(args.device)
    model = load_model(entry.name if entry.members else str(entry.path), device=device)
    domain_dir = domain_folder(entry)  # an ensemble's members share one domain
    batch = "auto" if args.batch_size == "auto" else int(args.batch_size)
    for path in inputs:
        try:
            vol = read_volume(path)
        except ImageReadError as exc:
            raise UserError(str(exc)) from None
        check = check_input(entry.name, domain_dir, vol.array, vol.ijk_to_ras, colour=vol.colour, axis=args.axis)
        if check is not None and not check.ok:
            if not args.force:
                fits = fitting_models(list_models(), vol.array, vol.ijk_to_ras, colour=vol.colour, exclude=entry.name)
                raise UserError(f"{path}: {check.message(fits)}")
            print(f"textguidedseg: warning: {path}: model '{entry.name}' is for {check.domain.summary()}, but "
                  f"{'; '.join(check.problems)}; segmenting anyway (--force)", file=sys.stderr)
        n_slices = vol.array.shape[0]
        bar = tqdm(total=max(1, len(prompts)) * n_slices, unit="slice", disable=args.quiet, file=sys.stderr,
                   desc=f"{path.name} ({max(1, len(prompts))} prompt(s) x slices)")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        start = time.perf_counter()
        try:
            results = segment_volume(vol.array, vol.ijk_to_ras, prompts, model, axis=args.axis, batch_size=batch,
                                     threshold=args.threshold, device=device, prompt_laterality=args.laterality,
                                     return_probability=args.probability, samples=args.samples, seed=args.seed,
                                     flip=args.flip, progress=progress)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from None
        finally:
            bar.close()
        styles = [style_for(r.prompt, i) for i, r in enumerate(results)]
        names = unique_names([s.name for s in styles])
        segments = [SegmentSpec(name=n, mask=r.labels, color=s.color, prompt=r.prompt, terminology=s.terminology,
                                tags=answer_tags(r)) for n, s, r in zip(names, styles, results)]
        stem = _stem(path)
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder
        seg_path = write_segmentation(targets[path], segments, vol.ijk_to_ras)
        if args.labelmap:
            labels = np.zeros(results[0].labels.shape, dtype=np.uint16 if len(results) > 255 else np.uint8)
            for value, r in enumerate(results, 1):
                labels[r.labels > 0] = value
            write_labelmap(out_dir / f"{stem}_labels.nii.gz", labels, vol.ijk_to_ras)
        for n, r in zip(names, results):
            # models that sample masks and ensembles also give an uncertainty (variance of the sampled
            # probabilities; of an ensemble's members)
            for kind, array in (("probability", r.probability), ("uncertainty", r.uncertainty)):
                if array is not None:
                    write_volume(out_dir / f"{stem}_{file_safe_name(n)}_{kind}.nrrd", array, vol.ijk_to_ras)
        seconds = time.perf_counter() - start
        answers = ", ".join(f"{n}: {describe_answer(r)}" for n, r in zip(names, results))
        print(f"{seg_path}  ({answers}; {seconds:.1f} s)")
    return 0


def answer_tags(result) -> dict:
    """The segment tags that carry a result's answer (verdict and confidence)."""
    from .io import CONFIDENCE_TAG, VERDICT_TAG

    return {VERDICT_TAG: result.verdict, CONFIDENCE_TAG: f"{result.confidence:.3f}"}


def describe_answer(result) -> str:
    """'found, 2944 voxels, confidence 0.93' / 'not found (no voxel above the threshold)' / 'not found
    (faint: 12 voxels, confidence 0.55)'."""
    if result.voxels == 0:
        return "not found (no voxel above the threshold)"
    if result.verdict != "found":
        return f"not found (faint: {result.voxels} voxels, confidence {result.confidence:.2f})"
    return f"found, {result.voxels} voxels, confidence {result.confidence:.2f}"


def file_safe_name(name: str) -> str:
    """A segment name as part of a file name: letters, digits, '-' and '_' only, at most 40 characters."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import read_dataset
    from .engine import select_device
    from .ensemble import Ensemble
    from .evaluation import evaluate_cases
    from .model_store import load_model

    if args.dataset in VOLUME_DATASETS:
        return _evaluate_volumes(args)
    options = {"prompt": args.prompt_key} if args.dataset == "kvasir" else {}
    try:
        cases = read_dataset(args.dataset, args.data_root, args.split, **options)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if args.limit:
        cases = cases[: args.limit]
    device = select_device(args.device)
    model = load_model(args.model, device=device)
    if args.no_prompt and model.requires_text:
        raise UserError(f"model '{model.name}' needs the reports as prompts; --no-prompt is for text-free models "
                        "(ProLearn)")
    with tqdm(total=len(cases), desc=f"evaluate {args.dataset}/{args.split}", unit="case", disable=args.quiet,
              file=sys.stderr) as bar:
        try:
            summary = evaluate_cases(model, cases, save_predictions=args.save_predictions,
                                     per_case_csv=args.per_case_csv, distances=not args.no_distances, device=device,
                                     samples=args.samples, seed=args.seed, use_text=not args.no_prompt,
                                     flip=args.flip, progress=lambda n, total: bar.update(n - bar.n))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    summary = {"model": model.name, "dataset": args.dataset, "split": args.split, "prompts": not args.no_prompt,
               "flip": bool(args.flip), **summary}
    if args.json:
        Path(args.json).write_text(encoding="utf-8", data=json.dumps(summary, indent=2) + "\n")
    print(f"model {model.name} on {args.dataset}/{args.split} ({summary['cases']} cases"
          f"{', text-free: no prompt' if args.no_prompt else ''}"
          f"{', text-aware flip' if args.flip else ''})")
    print(f"  Dice global (pooled pixels): {summary['dice_global']:.4f}")
    print(f"  Dice per-image (mean):       {summary['dice_per_image']:.4f}")
    print(f"  IoU global / per-image:      {summary['iou_global']:.4f} / {summary['iou_per_image']:.4f}")
    print(f"  HD95 / ASD (pixels, {summary['distance_cases']} cases): {summary['hd95_mean']:.2f} / "
          f"{summary['asd_mean']:.2f}")
    if "laterality_error_rate" in summary:
        print(f"  laterality error rate ({summary['laterality_cases']} one-sided cases, >10 % mass on the "
              f"other side): {summary['laterality_error_rate']:.4f}")
    if "uncertainty_auroc" in summary:
        source = ("the members' disagreement" if isinstance(model, Ensemble)
                  else f"variance of {args.samples or model.config.samples} samples")
        print(f"  uncertainty ({source}): AUROC for wrong pixels "
              f"{summary['uncertainty_auroc']:.4f}; Dice without the 10 % most uncertain pixels, global / per-image: "
              f"{summary['dice_global_confident90']:.4f} / {summary['dice_per_image_confident90']:.4f}")
    print(f"  slices/s: {summary['slices_per_second']:.1f} ({1000 * summary['seconds_per_case']:.1f} ms per image)")
    return 0


VOLUME_DATASETS = ("msd",)


def _evaluate_volumes(args: argparse.Namespace) -> int:
    """``evaluate --dataset msd``: one prompt per label, 3D scores per label (mean +- sd over volumes)."""
    from tqdm import tqdm

    from .data.msd import read_msd_dataset
    from .engine import select_device
    from .evaluation import evaluate_volumes, format_volume_summary
    from .model_store import load_model

    if args.no_prompt:
        raise UserError("--no-prompt is for 2D report datasets; volume datasets are scored one prompt per label")
    try:
        dataset = read_msd_dataset(args.data_root, args.split, split_file=args.split_file,
                                   prompt_table=args.prompt_table)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if args.limit:
        dataset.cases = dataset.cases[: args.limit]
    if not dataset.cases:
        raise UserError(f"split {args.split!r} of {args.data_root} has no cases")
    device = select_device(args.device)
    model = load_model(args.model, device=device)
    with tqdm(total=len(dataset.cases), desc=f"evaluate {dataset.name}/{args.split}", unit="volume",
              disable=args.quiet, file=sys.stderr) as bar:
        try:
            summary = evaluate_volumes(model, dataset, save_predictions=args.save_predictions,
                                       per_case_csv=args.per_case_csv, distances=not args.no_distances,
                                       device=device, threshold=args.threshold, axis=args.axis, flip=args.flip,
                                       progress=lambda n, total: bar.update(n - bar.n))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    summary = {"model": model.name, "dataset": args.dataset, "name": dataset.name, "split": args.split,
               "flip": bool(args.flip), **summary}
    if args.json:
        Path(args.json).write_text(encoding="utf-8", data=json.dumps(summary, indent=2) + "\n")
    print(f"model {model.name} on {dataset.name} ({args.dataset}) / {args.split}: {summary['cases']} volumes, "
          f"{dataset.modality}; Dice / HD95 / ASD per volume, mean +- sd (ddof 1) over volumes")
    for line in format_volume_summary(summary):
        print(line)
    if args.save_predictions:
        print(f"  label maps: {args.save_predictions}/<case id>.nii.gz (label values of dataset.json, each case's grid)")
    print(f"  slices/s: {summary['slices_per_second']:.1f}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .model_store import cache_dir, describe, import_model, list_models, resolve_model

    if args.action == "list":
        from .domain import read_domain
        from .model_store import DEFAULT_MODEL

        from .checkpoint import CheckpointError
        from .model_store import domain_folder

        entries = list_models()
        for e in entries:
            where = e.path if e.path is not None else f"(not downloaded: textguidedseg models download {e.name})"
            folder = e.path
            if e.members:
                where = "ensemble of " + ", ".join(f"{n} ({w:g})" for n, w in e.members)
                try:
                    folder = domain_folder(resolve_model(e.name))
                except CheckpointError as exc:  # a member missing or not downloaded: say so, list the rest
                    folder, where = None, f"{where}: {exc}"
            found = read_domain(folder) if folder is not None else None
            domain = found[0].summary().split(";")[0] if found else "(domain not stated)"
            name = e.name + (" (default)" if e.name == DEFAULT_MODEL else "")
            print(f"{name:34s} {e.model_type:9s} {e.source:8s} {domain:32s} {where}")
        if not entries:
            print("no models installed")
        print(f"(user cache: {cache_dir()})")
    elif args.action == "info":
        from .model_store import load_model

        entry = resolve_model(args.target)
        info = describe(entry)
        if not entry.members:
            info["parameters"] = load_model(str(entry.path)).parameter_counts()
        print(_model_summary(entry, info))
        print(json.dumps(info, indent=2))
    elif args.action == "import":
        if not args.target:
            raise UserError("models import needs a PATH (a model directory or .zip)")
        target = import_model(args.target, name=args.name, overwrite=args.overwrite)
        print(f"imported as {target.name} ({target})")
    elif args.action == "download":
        if not args.target:
            raise UserError("models download needs a NAME (see 'textguidedseg models list')")
        return _download(args.target, quiet=args.quiet)
    return 0


def _model_summary(entry, info: dict) -> str:
    """What ``models info`` prints before the raw JSON: what the model is for, in words."""
    from .domain import read_domain
    from .model_store import DEFAULT_MODEL

    from .model_store import domain_folder

    lines = [f"{entry.name}{' (default)' if entry.name == DEFAULT_MODEL else ''}: {entry.description or info['model_type']}"]
    if entry.members:
        lines.append("  members (weight): " + ", ".join(f"{n} ({w:g})" for n, w in entry.members)
                     + "; probabilities averaged before the threshold")
    found = read_domain(domain_folder(entry))
    if found is None:
        lines.append("  for: not stated (no domain.json): inputs are not checked before segmenting")
    else:
        domain = found[0]
        lines.append(f"  for: {domain.body_region} {domain.modality}, "
                     f"{'2D pictures' if domain.dimensionality == '2D' else '3D volumes'} ({domain.colour})")
        lines.append(f"  prompts: {domain.prompts}")
        lines.append(f"  statistics from: {domain.training_data or 'not stated'}")
        cal = domain.calibration
        if domain.threshold is not None and cal:
            refused = ", ".join(f"{k} {100 * v['combined']:.1f} %" for k, v in cal.get("detection_rate", {}).items())
            lines.append(f"  input check: threshold {domain.threshold:.2f}; false alarms on validation "
                         f"{100 * cal['validation_false_alarm_rate']['combined']:.1f} %; refused: {refused}")
    params = info.get("parameters", {})
    if params:
        lines.append("  parameters: " + ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.2f} M" for k, v in params.items()))
    if entry.licence:
        lines.append(f"  licence: {entry.licence}")
    if entry.path is not None:
        lines.append(f"  folder: {entry.path}")
    return "\n".join(lines)


def _download(name: str, quiet: bool = False) -> int:
    from tqdm import tqdm

    from .model_store import download_model

    bars: list = []  # created on the first chunk: nothing is shown when nothing is fetched

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=name, total=total or None, unit="B", unit_scale=True, unit_divisor=1024,
                             disable=quiet, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        target = download_model(name, progress=progress)
    except KeyboardInterrupt:
        print(f"textguidedseg: download of {name} interrupted; nothing was installed", file=sys.stderr)
        return 130
    finally:
        for bar in bars:
            bar.close()
    print(f"downloaded {name} ({target})" if bars else f"{name} is already installed ({target})")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or the option is a
    flag (off by default) or has no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textguidedseg", description="Text-guided medical image segmentation.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"textguidedseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    formatter = _HelpFormatter
    p = sub.add_parser("predict", help="segment images / volumes, one segment per prompt, write .seg.nrrd",
                       description="Segment images or volumes, one segment per prompt, into <input>.seg.nrrd. The "
                                   "input is first checked against the model's domain (see 'models list').",
                       formatter_class=formatter)
    p.add_argument("inputs", nargs="+", help="image or volume files, directories, DICOM series folders, @list.txt")
    p.add_argument("--prompt", action="append",
                   help="what to segment; repeat for several segments (leave out for text-free models: ProLearn)")
    p.add_argument("--output", "-o", required=True, help="output directory (<input>.seg.nrrd is written there)")
    p.add_argument("--model", "-m", default=None,
                   help="model name or directory (default: the shipped default); several models as one ensemble: "
                        "'a,b,c' (equal weights) or 'a:0.5,b:0.3,c:0.2' (weights summing to 1)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability at or above which a voxel is labelled")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", default="auto", help="slices per forward pass, or auto")
    p.add_argument("--axis", default="auto", help="auto, axial, coronal, sagittal, or array axis 0/1/2")
    p.add_argument("--laterality", default="patient", choices=("patient", "image"),
                   help="what 'left' in the prompt means: the patient's left (default) or the image's left half")
    p.add_argument("--probability", action="store_true", help="also write each prompt's probability volume")
    p.add_argument("--samples", type=int, default=None,
                   help="models that sample masks (SVP-CVAE): how many (default: the model's; 1 = no uncertainty). "
                        "Writes <input>_<segment>_uncertainty.nrrd (variance of the sampled probabilities)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (same seed, same samples)")
    p.add_argument("--flip", action="store_true",
                   help="text-aware test-time flip: also segment each slice mirrored left-right with 'left' and "
                        "'right' swapped in the prompt, and average the two answers (about twice the time; "
                        "sagittal slices are not flipped)")
    p.add_argument("--labelmap", action="store_true",
                   help="also write <input>_labels.nii.gz: label i = i-th prompt (a later prompt wins where two overlap)")
    p.add_argument("--shard", default=None, help="i/n: process every n-th input starting at i (cluster arrays)")
    p.add_argument("--force", action="store_true",
                   help="segment even an input the model's domain check refuses (a CT or MR volume given to a "
                        "chest X-ray model, ...); a warning is printed instead")
    p.add_argument("--overwrite", action="store_true", help="replace existing <input>.seg.nrrd files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="score a model on a dataset split (both Dice conventions; 3D for msd)",
                       description="Score a model on a dataset split: Dice (global and per-image), IoU, HD95, "
                                   "ASD, laterality error rate; for a volume dataset (msd), Dice, HD95 and ASD "
                                   "in mm per volume and label, mean +- sd over volumes.", formatter_class=formatter)
    e.add_argument("--model", "-m", default=None,
                   help="model name or directory (default: the shipped default), or an ensemble: 'a,b,c' or "
                        "'a:0.5,b:0.3,c:0.2'")
    e.add_argument("--dataset", required=True, choices=("qata", "kvasir", "csv", "msd"),
                   help="dataset layout; msd: a labelled volume dataset in the MSD / nnU-Net layout (dataset.json, "
                        "imagesTr, labelsTr, split.json), scored in 3D per label")
    e.add_argument("--data-root", required=True, help="dataset folder (or CSV file for --dataset csv)")
    e.add_argument("--split", default="val", help="split to score (test splits are withheld here)")
    e.add_argument("--split-file", default=None, help="msd: split file (default DATA_ROOT/split.json; without "
                   "one, the split 'all' holds every case)")
    e.add_argument("--prompt-table", default=None, help="msd: prompt table name (default: dataset.json's name)")
    e.add_argument("--axis", default="auto", help="msd: slice plane (auto, axial, coronal, sagittal, 0/1/2)")
    e.add_argument("--threshold", type=float, default=0.5,
                   help="msd: a voxel takes the most probable label if its probability is >= this")
    e.add_argument("--prompt-key", default="p6", help="Kvasir prompt key p1..p9")
    e.add_argument("--limit", type=int, default=None, help="first N cases only")
    e.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="write <case id>.png masks (msd: <case id>.nii.gz label maps) here")
    e.add_argument("--per-case-csv", default=None, metavar="FILE", help="write each case's scores here")
    e.add_argument("--json", default=None, metavar="FILE", help="write the summary as JSON")
    e.add_argument("--no-distances", action="store_true", help="skip HD95 / ASD (faster)")
    e.add_argument("--samples", type=int, default=None,
                   help="models that sample masks (SVP-CVAE): samples per case (default: the model's); "
                        "adds the uncertainty scores (AUROC for wrong pixels, Dice without the 10 %% most uncertain)")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    e.add_argument("--flip", action="store_true",
                   help="text-aware test-time flip (see predict --flip): scored like any model")
    e.add_argument("--no-prompt", action="store_true",
                   help="text-free models (ProLearn): segment with no prompt; the reports still pick the "
                        "one-sided cases of the laterality error rate")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="list, describe, import or download models", formatter_class=formatter,
                       description="list: one line per model with its domain (the default is marked); "
                                   "info NAME: what the model is for, its figures and files, then its raw config; "
                                   "import DIR_OR_ZIP: copy a model into the user cache after checking that it "
                                   "loads; download NAME: fetch a manifest model (SHA-256 checked).")
    m.add_argument("action", choices=("list", "info", "import", "download"), help="what to do (see above)")
    m.add_argument("target", nargs="?", help="model name (info, download) or a directory / .zip (import)")
    m.add_argument("--name", default=None, help="name in the cache (import)")
    m.add_argument("--overwrite", action="store_true", help="replace a cached model of the same name (import)")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bar (download)")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .checkpoint import CheckpointError

    try:
        return args.func(args)
    except (UserError, CheckpointError, FileNotFoundError, FileExistsError) as exc:
        print(f"textguidedseg: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # a text encoder that cannot load explains itself (TextEncoderError); its module imports torch, so
        # it is looked up only once it has been loaded (the model catalog commands stay torch-free)
        encoder = sys.modules.get(f"{__package__}.text.encoder")
        if encoder is None or not isinstance(exc, encoder.TextEncoderError):
            raise
        print(f"textguidedseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("textguidedseg: interrupted; outputs of unfinished inputs were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
