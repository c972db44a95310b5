"""Inference in a child Python process, the way SlicerTotalSegmentator and SlicerMONAIAuto3DSeg run
their models: a crash, a runaway allocation or an out-of-memory kill ends the child, never Slicer
and the user's unsaved scene.

The parent (the Slicer panel; it needs neither torch nor a model) writes a job folder and starts
``python -m TextGuidedSegLib.worker JOB_DIR`` (``PythonSlicer`` inside Slicer)::

    JOB_DIR/request.json    prompts, model, options, IJK->RAS                     written by the parent
    JOB_DIR/volume.npy      the (k, j, i) voxels                                  written by the parent
    JOB_DIR/events.jsonl    one JSON object per line, flushed per event           written by the child
    JOB_DIR/worker.log      the child's stdout and stderr (tracebacks, crashes)   written by the child
    JOB_DIR/results/        one .npy per array + results.json, renamed into place only once every
                            prompt is done                                        written by the child

Events: ``started`` (pid, python), ``status`` (text), ``download`` (done, total bytes),
``downloaded``, ``progress`` (done, total slices), ``done`` (model), ``error`` (message, traceback).
The parent reads the events file instead of a pipe: no reader thread is needed (inside Slicer the
Qt event loop keeps the GIL, which would starve one) and nothing blocks if the parent is busy.
:class:`WorkerJob` is the parent side: :meth:`WorkerJob.poll` returns the new events and, once
the child has exited, one final event: its own ``done`` / ``error``, ``cancelled``, or an ``error``
that explains a crash or a kill from its exit status and the end of its log.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

REQUEST_NAME = "request.json"
VOLUME_NAME = "volume.npy"
EVENTS_NAME = "events.jsonl"
LOG_NAME = "worker.log"
RESULTS_DIR = "results"
RESULTS_INDEX = "results.json"
#: Options of :func:`TextGuidedSegLib.engine.segment_volume` a job may set (others are refused).
JOB_OPTIONS = ("threshold", "device", "axis", "prompt_laterality", "return_probability", "samples", "seed",
               "batch_size")
#: After Cancel the child gets this long to stop by itself (it stops within one batch of slices or one
#: download chunk, and cleans up) before it is killed.
KILL_GRACE_SECONDS = 5.0
#: Lines of the child's log shown when it dies without saying why.
LOG_TAIL_LINES = 20


@dataclass
class WorkerResult:
    """One prompt's arrays, read back from the child (the fields ``write_results`` uses of a
    :class:`TextGuidedSegLib.engine.SegmentResult`)."""

    prompt: str
    model_prompt: str
    labels: np.ndarray
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    seconds: float = 0.0
    slices: int = 0


# ------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------


def default_worker_command(python: str | None = None) -> list[str]:
    """``[python, "-m", "TextGuidedSegLib.worker"]``: ``python`` defaults to this interpreter."""
    return [python or sys.executable, "-m", "TextGuidedSegLib.worker"]


def _library_parent() -> str:
    """The folder holding the ``TextGuidedSegLib`` package (in Slicer: the scripted-modules folder)."""
    return str(Path(__file__).resolve().parent.parent)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class WorkerJob:
    """One inference run in a child process, seen from the parent.

    Create it with :meth:`start`; call :meth:`poll` from a timer until it returns a final event
    (``done``, ``error`` or ``cancelled``: see :data:`FINAL_EVENTS`); then :meth:`results` (after
    ``done``) and :meth:`cleanup`, which removes the job folder. :meth:`cancel` asks the child to
    stop and kills it if it has not stopped after :data:`KILL_GRACE_SECONDS`.
    """

    FINAL_EVENTS = ("done", "error", "cancelled")

    def __init__(self, job_dir: Path, process: subprocess.Popen, log_file: Any) -> None:
        self.job_dir = job_dir
        self.process = process
        self._log_file = log_file
        self._offset = 0
        self._partial = b""
        self._finals: list[dict] = []  # the child's own done / error events, kept until it has exited
        self._cancelled_at: float | None = None
        self.final: dict | None = None

    @classmethod
    def start(cls, volume: np.ndarray, ijk_to_ras: np.ndarray, prompts: Sequence[str], model: str | None, *,
              options: dict | None = None, command: Sequence[str] | None = None,
              temp_root: str | None = None, env: dict | None = None) -> "WorkerJob":
        """Write the job folder and start the child.

        Args:
            volume: the ``(k, j, i)`` voxels (written as is: the child sees the same dtype and values).
            ijk_to_ras: the 4x4 IJK->RAS matrix.
            prompts: one segment per prompt (may be empty for text-free models).
            model: a model name, a model folder, or None (the default model).
            options: keyword options of ``segment_volume`` (see :data:`JOB_OPTIONS`).
            command: the child's command line without the job folder (default:
                :func:`default_worker_command`; the panel passes ``PythonSlicer`` inside Slicer).
            temp_root: where the job folder goes (default: the system's temporary folder).
            env: extra environment variables for the child.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(JOB_OPTIONS))
        if unknown:
            raise ValueError(f"unknown worker option(s) {', '.join(unknown)}; known: {', '.join(JOB_OPTIONS)}")
        matrix = np.asarray(ijk_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"IJK->RAS must be a 4x4 matrix, got shape {matrix.shape}")
        job_dir = Path(tempfile.mkdtemp(prefix="TextGuidedSeg-job-", dir=temp_root))
        log_file = None
        try:
            np.save(job_dir / VOLUME_NAME, np.asarray(volume), allow_pickle=False)
            request = {"prompts": list(prompts), "model": model, "ijk_to_ras": matrix.tolist(), "options": options}
            (job_dir / REQUEST_NAME).write_text(json.dumps(request), encoding="utf-8")
            child_env = dict(os.environ)
            child_env.update(env or {})
            # in Slicer the library is not pip-installed: it sits next to the module, on the parent's sys.path only
            child_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_library_parent(), child_env.get("PYTHONPATH", "")) if p)
            child_env["PYTHONUNBUFFERED"] = "1"
            child_env.setdefault("PYTHONIOENCODING", "utf-8")
            log_file = open(job_dir / LOG_NAME, "wb")
            popen_kwargs: dict = {}
            if sys.platform == "win32":
                popen_kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
            else:
                popen_kwargs["start_new_session"] = True  # Ctrl-C in a terminal goes to the parent only
            process = subprocess.Popen([*(command or default_worker_command()), str(job_dir)],
                                       stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       cwd=str(job_dir), env=child_env, **popen_kwargs)
        except BaseException:
            if log_file is not None:
                log_file.close()
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        logger.info("inference worker %d started in %s", process.pid, job_dir)
        return cls(job_dir, process, log_file)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def cancelled(self) -> bool:
        return self._cancelled_at is not None

    def cancel(self) -> None:
        """Ask the child to stop (SIGTERM; on Windows it is terminated at once). Idempotent."""
        if self._cancelled_at is not None:
            return
        self._cancelled_at = time.monotonic()
        if self.process.poll() is None:
            try:
                self.process.terminate()
            except OSError:  # already gone
                pass

    def _read_new_events(self) -> list[dict]:
        path = self.job_dir / EVENTS_NAME
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the next poll
        events = []
        for line in lines:
            if line.strip():
                try:
                    events.append(json.loads(line.decode("utf-8")))
                except ValueError:
                    logger.warning("inference worker: unreadable event line %r", line[:200])
        return events

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the child's stdout / stderr."""
        try:
            text = (self.job_dir / LOG_NAME).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def poll(self) -> list[dict]:
        """The events written since the last call; once the child has exited, ending with the final event."""
        if self.final is not None:
            return []
        if self._cancelled_at is not None and self.process.poll() is None and (
                time.monotonic() - self._cancelled_at > KILL_GRACE_SECONDS):
            logger.warning("inference worker %d did not stop after Cancel: killing it", self.pid)
            self.process.kill()
        returncode = self.process.poll()  # before reading: every event of an exited child is then on disk
        new = self._read_new_events()
        self._finals += [e for e in new if e.get("event") in self.FINAL_EVENTS]
        events = [e for e in new if e.get("event") not in self.FINAL_EVENTS]
        if returncode is None:
            return events
        self.final = self._final_event(returncode, self._finals)
        self._log_file.close()
        return events + [self.final]

    def _final_event(self, returncode: int, finals: list[dict]) -> dict:
        if self._cancelled_at is not None:
            return {"event": "cancelled"}
        own = next((e for e in finals if e.get("event") in ("done", "error")), None)
        if own is not None and (own["event"] == "error" or returncode == 0):
            return own
        tail = self.log_tail()
        if returncode < 0:
            name = _signal_name(-returncode)
            if -returncode == getattr(signal, "SIGKILL", 9):
                message = ("the inference process was killed (SIGKILL) before it finished, most likely by the "
                           "system because memory ran out: close other programs, segment fewer prompts at a "
                           "time, or use another device")
            else:
                message = f"the inference process crashed ({name}) before it finished"
        elif returncode == 0:
            message = "the inference process ended without results"
        else:
            message = f"the inference process failed with exit code {returncode}"
        return {"event": "error", "message": message + "; the scene was not changed",
                "traceback": tail or "(the process wrote nothing)", "returncode": returncode}

    def results(self) -> list[WorkerResult]:
        """The arrays of a job whose final event was ``done``."""
        if self.final is None or self.final.get("event") != "done":
            raise RuntimeError("the inference worker has not finished successfully")
        return read_results(self.job_dir / RESULTS_DIR)

    def cleanup(self) -> None:
        """Stop the child if it still runs and remove the job folder."""
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                logger.warning("inference worker %d did not exit", self.pid)
        if not self._log_file.closed:
            self._log_file.close()
        shutil.rmtree(self.job_dir, ignore_errors=True)


def read_results(results_dir: Path) -> list[WorkerResult]:
    """The per-prompt arrays the child wrote (see :func:`write_results`)."""
    index = json.loads((results_dir / RESULTS_INDEX).read_text(encoding="utf-8"))
    out = []
    for item in index["results"]:
        arrays = {kind: (np.load(results_dir / name, allow_pickle=False) if name else None)
                  for kind, name in item["files"].items()}
        out.append(WorkerResult(prompt=item["prompt"], model_prompt=item["model_prompt"], labels=arrays["labels"],
                                probability=arrays.get("probability"), uncertainty=arrays.get("uncertainty"),
                                seconds=float(item["seconds"]), slices=int(item["slices"])))
    return out


# ------------------------------------------------------------------------------------------------
# child side
# ------------------------------------------------------------------------------------------------


class _Events:
    """Appends one JSON line per event and flushes it, so the parent sees it at once."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def __call__(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_results(results: Sequence, results_dir: Path, model_name: str) -> None:
    """Write each result's arrays as .npy plus ``results.json``; the folder appears only when complete."""
    partial = results_dir.with_name(results_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    index = []
    for i, r in enumerate(results):
        files = {}
        for kind in ("labels", "probability", "uncertainty"):
            array = getattr(r, kind, None)
            files[kind] = None
            if array is not None:
                files[kind] = f"{i:03d}-{kind}.npy"
                np.save(partial / files[kind], array, allow_pickle=False)
        index.append({"prompt": r.prompt, "model_prompt": r.model_prompt, "files": files,
                      "seconds": float(r.seconds), "slices": int(r.slices)})
    (partial / RESULTS_INDEX).write_text(json.dumps({"model": model_name, "results": index}), encoding="utf-8")
    os.replace(partial, results_dir)


def run_job(job_dir: Path, emit: _Events, cancel: threading.Event) -> str:
    """Download (if needed), load and run the model of the job in ``job_dir``; returns the model's name."""
    request = json.loads((job_dir / REQUEST_NAME).read_text(encoding="utf-8"))
    volume = np.load(job_dir / VOLUME_NAME, allow_pickle=False)
    from .engine import segment_volume, select_device
    from .model_store import DEFAULT_MODEL, download_model, load_model, needs_download

    model = request.get("model") or DEFAULT_MODEL
    if needs_download(model):
        emit("status", text=f"Downloading model {model}…")
        download_model(model, progress=lambda done, total: emit("download", done=done, total=total), cancel=cancel)
        emit("downloaded", model=model)
    options = dict(request.get("options") or {})
    device = select_device(options.pop("device", "auto"))
    emit("status", text="Loading model…")
    loaded = load_model(model, device=device)
    if not getattr(loaded.model, "samples_masks", False):
        options.pop("samples", None)  # the panel's sample count only means something to sampling models
    emit("status", text=f"Segmenting with {loaded.name}…")
    results = segment_volume(volume, np.asarray(request["ijk_to_ras"], dtype=np.float64), request["prompts"],
                             loaded, device=device, cancel=cancel,
                             progress=lambda done, total: emit("progress", done=done, total=total), **options)
    write_results(results, job_dir / RESULTS_DIR, loaded.name)
    return loaded.name


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m TextGuidedSegLib.worker JOB_DIR``. Exit 0 on success, 1 on an
    error (reported as an ``error`` event), 2 when cancelled."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m TextGuidedSegLib.worker JOB_DIR (a folder written by WorkerJob.start)",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a crash in native code leaves its Python stack in the log the panel shows
    job_dir = Path(args[0])
    emit = _Events(job_dir / EVENTS_NAME)
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())  # stop within one batch, clean up
    emit("started", pid=os.getpid(), python=sys.version.split()[0])
    logger.info("TextGuidedSeg inference worker %d, Python %s, job %s", os.getpid(), sys.version.split()[0], job_dir)
    try:
        emit("status", text="Loading libraries…")
        from .engine import SegmentationCancelled
        from .model_store import DownloadCancelled

        try:
            name = run_job(job_dir, emit, cancel)
        except (SegmentationCancelled, DownloadCancelled):
            emit("cancelled")
            return 2
        emit("done", model=name)
        return 0
    except Exception as exc:
        emit("error", message=str(exc) or type(exc).__name__, type=type(exc).__name__,
             traceback=traceback.format_exc())
        return 1
    finally:
        emit.close()

if __name__ == "__main__":
    sys.exit(main())
