"""Segment volumes from text prompts without a GUI: one ``<stem>.seg.nrrd`` per input.

In Slicer (the module's own Logic, Slicer's Python)::

    Slicer --no-main-window --python-script TextGuidedSeg/Scripts/batch_segment.py -- \\
        --input scans/ --prompt "lung infection" --prompt "left lung" --output out/

In plain Python with PyPI ``slicer-core`` (same Logic, no Slicer application)::

    python TextGuidedSeg/Scripts/batch_segment.py --input scan.nrrd --prompt "lung infection" --output out/

Inputs: image files (NRRD, NIfTI, MHA, PNG, ...), folders of them, DICOM series folders, ``@list.txt``.
Each input is read with ``TextGuidedSegLib.io.read_volume`` into a fresh MRML scene, segmented with
``TextGuidedSegLogic.process`` and written with ``vtkMRMLSegmentationStorageNode`` to a temporary
name, then moved into place, so a failed input never leaves a partial file. Exit status: 0 on
success, 2 for a problem with the inputs or options (one-line message; an input that cannot be
read is reported and skipped, the others are still segmented), 1 for anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

# Slicer's --python-script sets __file__; sys.argv[0] is the fallback.
SCRIPT_DIR = Path(globals().get("__file__") or sys.argv[0]).resolve().parent
MODULE_DIR = SCRIPT_DIR.parent  # TextGuidedSeg.py; installed: TextGuidedSegLib/ is here too
REPO_DIR = MODULE_DIR.parent  # source tree: TextGuidedSegLib/ is here

logger = logging.getLogger("batch_segment")


class BatchError(Exception):
    """A problem with the inputs or options: reported in one line, exit status 2."""


def _add_import_paths() -> None:
    for folder in (MODULE_DIR, REPO_DIR):
        if (folder / "TextGuidedSeg.py").is_file() or (folder / "TextGuidedSegLib").is_dir():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch_segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", "-i", action="append", required=True,
                        help="image / volume file, folder, DICOM series folder or @list.txt (repeatable)")
    parser.add_argument("--prompt", "-p", action="append", default=[],
                        help="what to segment; repeat for several segments (leave out for text-free models: ProLearn)")
    parser.add_argument("--output", "-o", required=True, help="output folder (<stem>.seg.nrrd is written there)")
    parser.add_argument("--model", "-m", default=None,
                        help="model name or folder (default: the shipped default), or an ensemble "
                             "'a,b' / 'a:0.6,b:0.4'")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--axis", default="auto", help="auto, axial, coronal, sagittal, or array axis 0/1/2")
    parser.add_argument("--laterality", default="patient", choices=("patient", "image"),
                        help="what 'left' in a prompt means: the patient's left (default) or the image's left half")
    parser.add_argument("--probability", action="store_true",
                        help="also write <stem>_<segment>_probability.nrrd per prompt")
    parser.add_argument("--samples", type=int, default=None,
                        help="models that sample masks (SVP-CVAE): masks per prompt; writes "
                             "<stem>_<segment>_uncertainty.nrrd (variance of the sampled probabilities)")
    parser.add_argument("--flip", action="store_true",
                        help="text-aware test-time flip (as textguidedseg predict --flip)")
    parser.add_argument("--force", action="store_true",
                        help="segment even inputs the model's domain check refuses (as textguidedseg predict --force)")
    parser.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    return parser


def _stem(path: Path) -> str:
    from TextGuidedSegLib.cli import VOLUME_SUFFIXES

    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def write_segmentation_node(segmentationNode, path: Path) -> Path:
    """Write with vtkMRMLSegmentationStorageNode to a temporary name in the same folder, then move into place."""
    import slicer

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name[: -len('.seg.nrrd')]}.{uuid.uuid4().hex[:12]}.tmp.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp))
    try:
        if not storage.WriteData(segmentationNode) or not tmp.is_file():
            raise RuntimeError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def segment_file(logic, path: Path, args: argparse.Namespace, model) -> list[Path]:
    import slicer
    from TextGuidedSeg import PROBABILITY_REFERENCE_ROLE, SEGMENT_ID_ATTRIBUTE, UNCERTAINTY_REFERENCE_ROLE
    from TextGuidedSegLib.cli import file_safe_name
    from TextGuidedSegLib.io import ImageReadError, read_volume, write_volume

    try:
        volume = read_volume(path)
    except ImageReadError as exc:
        raise BatchError(str(exc)) from None
    scene = slicer.vtkMRMLScene()  # one scene per input: nothing accumulates over a long batch
    try:
        volumeNode = logic.addVolumeFromArray(scene, volume.array, volume.ijk_to_ras, _stem(path))
        check, fits = logic.checkDomain(volumeNode, args.model, args.axis)
        if check is not None and not check.ok:  # as textguidedseg predict: refuse unless --force
            if not args.force:
                raise BatchError(f"{path}: {check.message(fits)}")
            logger.warning("%s: model '%s' is for %s, but %s; segmenting anyway (--force)", path, check.model,
                           check.domain.summary(), "; ".join(check.problems))
        last = [-1]

        def progress(done: int, total: int) -> None:
            percent = 100 * done // max(total, 1)
            if percent // 10 != last[0] // 10 or done == total:
                logger.info("%s: %d / %d slices", path.name, done, total)
            last[0] = percent

        start = time.perf_counter()
        try:
            segmentationNode = logic.process(volumeNode, args.prompt, model, threshold=args.threshold,
                                             device=args.device, axis=args.axis, laterality=args.laterality,
                                             probability=args.probability, samples=args.samples,
                                             flip=args.flip, progress=progress)
        except ValueError as exc:
            raise BatchError(f"{path}: {exc}") from None
        out_dir = Path(args.output)
        written = [write_segmentation_node(segmentationNode, out_dir / f"{_stem(path)}.seg.nrrd")]
        segmentation = segmentationNode.GetSegmentation()
        for role, kind in ((PROBABILITY_REFERENCE_ROLE, "probability"), (UNCERTAINTY_REFERENCE_ROLE, "uncertainty")):
            for index in range(segmentationNode.GetNumberOfNodeReferences(role)):
                node = segmentationNode.GetNthNodeReference(role, index)
                segment = segmentation.GetSegment(node.GetAttribute(SEGMENT_ID_ATTRIBUTE))
                target = out_dir / f"{_stem(path)}_{file_safe_name(segment.GetName())}_{kind}.nrrd"
                written.append(write_volume(target, logic.volumeArray(node), logic.ijkToRasArray(node)))
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        logger.info("%s -> %s (%s; %.1f s)", path, written[0], ", ".join(names), time.perf_counter() - start)
        return written
    finally:
        scene.Clear(1)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":  # Slicer ... --python-script batch_segment.py -- --input ...
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="batch_segment: %(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _add_import_paths()
    try:
        try:
            import slicer  # noqa: F401  (the module's Logic writes real MRML nodes)
        except ImportError:
            raise BatchError(
                "this script needs Slicer's Python: run it with 'Slicer --no-main-window --python-script "
                f"{SCRIPT_DIR / 'batch_segment.py'} -- ...', or install PyPI slicer-core (Python 3.10 or newer: pip "
                "install slicer-core); without either, 'textguidedseg predict' writes the same .seg.nrrd files"
            ) from None
        from TextGuidedSegLib.cli import UserError, collect_inputs

        try:
            inputs = collect_inputs(args.input)
        except UserError as exc:
            raise BatchError(str(exc)) from None
        # a folder may already hold results of an earlier run
        inputs = [p for p in inputs if not p.name.lower().endswith(".seg.nrrd")]
        if not inputs:
            raise BatchError("no inputs")
        if not 0.0 < args.threshold < 1.0:
            raise BatchError(f"--threshold must be between 0 and 1, got {args.threshold}")
        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise BatchError(f"--output {args.output} exists and is not a folder")

        from TextGuidedSeg import InstallError, TextGuidedSegLogic

        logic = TextGuidedSegLogic()
        try:
            logic.setupPythonRequirements(interactive=False)
        except InstallError as exc:
            raise BatchError(exc.message) from None
        from TextGuidedSegLib.checkpoint import CheckpointError

        try:
            model = logic.loadModel(args.model, args.device)
        except (CheckpointError, ValueError) as exc:
            raise BatchError(str(exc)) from None
        if not args.prompt and model.requires_text:
            raise BatchError(f"model '{model.name}' needs --prompt (it has no text-free mode)")
        logger.info("model %s; %d input(s); prompts: %s", model.name, len(inputs), "; ".join(args.prompt))
        failed = []
        for number, path in enumerate(inputs, 1):
            logger.info("[%d/%d] %s", number, len(inputs), path)
            try:
                segment_file(logic, path, args, model)
            except BatchError as exc:  # one unreadable input does not stop the batch
                print(f"batch_segment: error: {exc}", file=sys.stderr)
                failed.append(path)
        if failed:
            print(f"batch_segment: {len(failed)} of {len(inputs)} input(s) failed and were not written: "
                  + ", ".join(str(p) for p in failed), file=sys.stderr)
            return 2
    except BatchError as exc:
        print(f"batch_segment: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batch_segment: interrupted; unfinished inputs were not written", file=sys.stderr)
        return 130
    except Exception as exc:
        logger.exception("failed")
        print(f"batch_segment: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _exit(status: int) -> None:
    try:
        import slicer
    except ImportError:  # main() has said what to install
        sys.exit(status)
    if hasattr(slicer, "app") and hasattr(slicer.util, "exit"):
        slicer.util.exit(status)  # quits the Slicer application started with --python-script
    else:
        sys.exit(status)


if __name__ == "__main__":
    _exit(main())
