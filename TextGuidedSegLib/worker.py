"""Inference in a child Python process, the way SlicerTotalSegmentator and SlicerMONAIAuto3DSeg run
their models: a crash, a runaway allocation or an out-of-memory kill ends the child, never Slicer
and the user's unsaved scene.

The parent (the Slicer panel; it needs neither torch nor a model) starts ``python -m
TextGuidedSegLib.worker`` (``PythonSlicer`` inside Slicer; :class:`WorkerProcess`), which stays loaded
between runs, and hands it one job folder per run on its stdin (:class:`WorkerJob`)::

    JOB_DIR/request.json    prompts, model, options, IJK->RAS                     written by the parent
    JOB_DIR/volume.npy      the (k, j, i) voxels                                  written by the parent
    JOB_DIR/events.jsonl    one JSON object per line, flushed per event           written by the child
    JOB_DIR/results/        one .npy per array + results.json, renamed into place only once every
                            prompt is done                                        written by the child

The child's stdout and stderr (tracebacks, crash reports) go to ``worker.log`` in its own folder.
Events: ``started`` (pid, python, warm), ``status`` (text), ``download`` (done, total bytes),
``downloaded``, ``progress`` (done, total slices), ``done`` (model), ``error`` (message, traceback).
The parent reads the events file instead of a pipe: no reader thread is needed (inside Slicer the
Qt event loop keeps the GIL, which would starve one) and nothing blocks if the parent is busy.
:class:`WorkerJob` is the parent side: :meth:`WorkerJob.poll` returns the new events and, once
the job is over, one final event: the child's own ``done`` / ``error``, ``cancelled``, or an
``error`` that explains a crash or a kill from its exit status and the end of its log.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import queue
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
               "batch_size", "flip")
#: After Cancel the child gets this long to stop by itself (it stops within one batch of slices or one
#: download chunk, and cleans up) before it is killed.
KILL_GRACE_SECONDS = 5.0
#: Lines of the child's log shown when it dies without saying why.
LOG_TAIL_LINES = 20
#: A child with no job for this long exits (a new one starts at the next run).
IDLE_SECONDS = 600.0


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
    voxels: int = 0
    confidence: float = 0.0

    @property
    def verdict(self) -> str:
        from .io import verdict

        return verdict(self.voxels, self.confidence)


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


class WorkerProcess:
    """A child Python that runs jobs one after another and stays loaded in between.

    It reads job folders from its stdin, one per line, and keeps torch and the last model loaded, so
    a second Apply skips the Python start, ``import torch`` and the model load. It exits when its
    stdin closes (the parent ended, or :meth:`close`), after ``idle_seconds`` without a job (the
    memory goes back to the system), on SIGTERM while idle, or when it crashes; the parent then
    starts a new one. Its stdout and stderr go to ``worker.log`` in its own temporary folder.
    """

    def __init__(self, command: Sequence[str] | None = None, *, env: dict | None = None,
                 temp_root: str | None = None, idle_seconds: float = IDLE_SECONDS) -> None:
        self.command = list(command or default_worker_command())
        self.folder = Path(tempfile.mkdtemp(prefix="TextGuidedSeg-worker-", dir=temp_root))
        child_env = dict(os.environ)
        child_env.update(env or {})
        # in Slicer the library is not pip-installed: it sits next to the module, on the parent's sys.path only
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_library_parent(), child_env.get("PYTHONPATH", "")) if p)
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.setdefault("PYTHONIOENCODING", "utf-8")
        popen_kwargs: dict = {}
        if sys.platform == "win32":
            popen_kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            popen_kwargs["start_new_session"] = True  # Ctrl-C in a terminal goes to the parent only
        self._log_file = open(self.folder / LOG_NAME, "wb")
        try:
            self.process = subprocess.Popen([*self.command, "--idle-seconds", str(float(idle_seconds))],
                                            stdin=subprocess.PIPE, stdout=self._log_file, stderr=subprocess.STDOUT,
                                            cwd=str(self.folder), env=child_env, **popen_kwargs)
        except BaseException:
            self._log_file.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        logger.info("inference worker %d started (%s)", self.process.pid, " ".join(self.command))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, job_dir: Path) -> None:
        """Hand a job folder to the child (it starts as soon as the previous job has ended)."""
        try:
            self.process.stdin.write((str(job_dir) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise RuntimeError(f"the inference process has ended (exit status {self.process.poll()}); "
                               "start a new one") from exc

    def interrupt(self) -> None:
        """Cancel the running job (SIGTERM: the child stops within one batch; on Windows it is ended)."""
        if self.alive:
            try:
                self.process.terminate()
            except OSError:  # already gone
                pass

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                logger.warning("inference worker %d did not exit", self.pid)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the child's stdout / stderr."""
        try:
            text = (self.folder / LOG_NAME).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def close(self, timeout: float = 5.0) -> None:
        """Let the child exit (stdin closed), kill it if it does not within ``timeout``, remove its folder."""
        if self.alive:
            try:
                self.process.stdin.close()
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        self._log_file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class WorkerJob:
    """One inference run in a child process, seen from the parent.

    Create it with :meth:`start`; call :meth:`poll` from a timer until it returns a final event
    (``done``, ``error`` or ``cancelled``: see :data:`FINAL_EVENTS`); then :meth:`results` (after
    ``done``) and :meth:`cleanup`, which removes the job folder. :meth:`cancel` asks the child to
    stop and kills it if it has not stopped after :data:`KILL_GRACE_SECONDS`.
    """

    FINAL_EVENTS = ("done", "error", "cancelled")

    def __init__(self, job_dir: Path, worker: WorkerProcess) -> None:
        self.job_dir = job_dir
        self.worker = worker
        self._offset = 0
        self._partial = b""
        self._cancelled_at: float | None = None
        self.final: dict | None = None

    @classmethod
    def start(cls, volume: np.ndarray, ijk_to_ras: np.ndarray, prompts: Sequence[str], model: str | None, *,
              options: dict | None = None, worker: WorkerProcess | None = None,
              temp_root: str | None = None) -> "WorkerJob":
        """Write the job folder and hand it to ``worker`` (a new :class:`WorkerProcess` when None).

        Args:
            volume: the ``(k, j, i)`` voxels (written as is: the child sees the same dtype and values).
            ijk_to_ras: the 4x4 IJK->RAS matrix.
            prompts: one segment per prompt (may be empty for text-free models).
            model: a model name, a model folder, or None (the default model).
            options: keyword options of ``segment_volume`` (see :data:`JOB_OPTIONS`).
            worker: a running :class:`WorkerProcess` to reuse (the panel keeps one).
            temp_root: where the job folder goes (default: the system's temporary folder).
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(JOB_OPTIONS))
        if unknown:
            raise ValueError(f"unknown worker option(s) {', '.join(unknown)}; known: {', '.join(JOB_OPTIONS)}")
        matrix = np.asarray(ijk_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"IJK->RAS must be a 4x4 matrix, got shape {matrix.shape}")
        job_dir = Path(tempfile.mkdtemp(prefix="TextGuidedSeg-job-", dir=temp_root))
        try:
            np.save(job_dir / VOLUME_NAME, np.asarray(volume), allow_pickle=False)
            request = {"prompts": list(prompts), "model": model, "ijk_to_ras": matrix.tolist(), "options": options}
            (job_dir / REQUEST_NAME).write_text(json.dumps(request), encoding="utf-8")
            if worker is None:
                worker = WorkerProcess(temp_root=temp_root)
            worker.submit(job_dir)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        return cls(job_dir, worker)

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def cancelled(self) -> bool:
        return self._cancelled_at is not None

    def cancel(self) -> None:
        """Ask the child to stop this job (it is killed if it has not after the grace time). Idempotent."""
        if self._cancelled_at is None and self.final is None:
            self._cancelled_at = time.monotonic()
            self.worker.interrupt()

    def _read_new_events(self) -> list[dict]:
        try:
            with open(self.job_dir / EVENTS_NAME, "rb") as f:
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

    def poll(self) -> list[dict]:
        """The events written since the last call, ending with the final event once the job is over."""
        if self.final is not None:
            return []
        if self._cancelled_at is not None and self.worker.alive and (
                time.monotonic() - self._cancelled_at > KILL_GRACE_SECONDS):
            logger.warning("inference worker %d did not stop after Cancel: killing it", self.pid)
            self.worker.kill()
        returncode = self.worker.process.poll()  # before reading: a dead child's events are all on disk
        new = self._read_new_events()
        events = [e for e in new if e.get("event") not in self.FINAL_EVENTS]
        own = next((e for e in new if e.get("event") in self.FINAL_EVENTS), None)
        if own is None and returncode is None:
            return events
        if self._cancelled_at is not None:
            self.final = {"event": "cancelled"}
        else:
            self.final = own if own is not None else self._death_event(returncode)
        return events + [self.final]

    def _death_event(self, returncode: int) -> dict:
        """The final event of a job whose child died without finishing it: why, from its exit status."""
        if returncode < 0:
            name = _signal_name(-returncode)
            if -returncode == getattr(signal, "SIGKILL", 9):
                message = ("the inference process was killed (SIGKILL) before it finished, most likely by the "
                           "system because memory ran out: close other programs, segment fewer prompts at a "
                           "time, or use another device")
            else:
                message = f"the inference process crashed ({name}) before it finished"
        else:
            message = f"the inference process ended with exit status {returncode} before it finished"
        return {"event": "error", "message": message + "; the scene was not changed",
                "traceback": self.worker.log_tail() or "(the process wrote nothing)", "returncode": returncode}

    def results(self) -> list[WorkerResult]:
        """The arrays of a job whose final event was ``done``."""
        if self.final is None or self.final.get("event") != "done":
            raise RuntimeError("the inference worker has not finished successfully")
        return read_results(self.job_dir / RESULTS_DIR)

    def cleanup(self) -> None:
        """Remove the job folder; a job abandoned before its end takes its (busy) child with it."""
        if self.final is None:
            self.worker.kill()
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
                                seconds=float(item["seconds"]), slices=int(item["slices"]),
                                voxels=int(item["voxels"]), confidence=float(item["confidence"])))
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
                      "seconds": float(r.seconds), "slices": int(r.slices), "voxels": int(r.voxels),
                      "confidence": float(r.confidence)})
    (partial / RESULTS_INDEX).write_text(json.dumps({"model": model_name, "results": index}), encoding="utf-8")
    os.replace(partial, results_dir)


def run_job(job_dir: Path, emit: _Events, cancel: threading.Event) -> str:
    """Download (if needed), load and run the model of the job in ``job_dir``; returns the model's name."""
    request = json.loads((job_dir / REQUEST_NAME).read_text(encoding="utf-8"))
    volume = np.load(job_dir / VOLUME_NAME, allow_pickle=False)
    from .engine import segment_volume, select_device
    from .model_store import DEFAULT_MODEL, download_model, forget_loaded_models, load_model, needs_download

    model = request.get("model") or DEFAULT_MODEL
    if needs_download(model):
        emit("status", text=f"Downloading model {model}…")
        download_model(model, progress=lambda done, total: emit("download", done=done, total=total), cancel=cancel)
        emit("downloaded", model=model)
    options = dict(request.get("options") or {})
    device = select_device(options.pop("device", "auto"))
    key = (model, str(device))
    if _LAST_MODEL and _LAST_MODEL[0] != key:
        forget_loaded_models()  # keep one model warm, not every model of the session
    _LAST_MODEL[:] = [key]
    emit("status", text="Loading model…")
    loaded = load_model(model, device=device)
    if not loaded.samples_masks:  # (an ensemble: when no member samples)
        options.pop("samples", None)  # the panel's sample count only means something to sampling models
    emit("status", text=f"Segmenting with {loaded.name}…")
    results = segment_volume(volume, np.asarray(request["ijk_to_ras"], dtype=np.float64), request["prompts"],
                             loaded, device=device, cancel=cancel,
                             progress=lambda done, total: emit("progress", done=done, total=total), **options)
    write_results(results, job_dir / RESULTS_DIR, loaded.name)
    return loaded.name


_LAST_MODEL: list = []  # (model, device) of the previous job of this process


def run_one(job_dir: Path, cancel: threading.Event) -> None:
    """Run one job, reporting everything (its end included) as events in ``job_dir``; never raises an
    ``Exception``."""
    emit = _Events(job_dir / EVENTS_NAME)
    try:
        emit("started", pid=os.getpid(), python=sys.version.split()[0], warm="torch" in sys.modules)
        emit("status", text="Loading libraries…")
        from .engine import SegmentationCancelled
        from .model_store import DownloadCancelled

        try:
            name = run_job(job_dir, emit, cancel)
        except (SegmentationCancelled, DownloadCancelled):
            emit("cancelled")
            return
        emit("done", model=name)
    except Exception as exc:
        emit("error", message=str(exc) or type(exc).__name__, type=type(exc).__name__,
             traceback=traceback.format_exc())
    finally:
        emit.close()


def _read_lines(stream: Any, lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        if line.strip():
            lines.put(line.strip())
    lines.put(None)  # stdin closed: the parent has gone or is done with us


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m TextGuidedSegLib.worker [--idle-seconds S]`` runs the job folders
    (written by :meth:`WorkerJob.start`) named on its stdin, one per line, one after another."""
    parser = argparse.ArgumentParser(prog="python -m TextGuidedSegLib.worker",
                                     description="Run the segmentation jobs whose folders arrive on stdin, one "
                                                 "per line (written by TextGuidedSegLib.worker.WorkerJob.start).")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS,
                        help="exit after this long without a job (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a crash in native code leaves its Python stack in the log the panel shows
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(sys.stdin, lines), name="stdin", daemon=True).start()
    running: list = []  # the cancel event of the job being run, if any

    def on_sigterm(signum: int, frame: Any) -> None:
        if running:
            running[0].set()  # the job stops within one batch or one download chunk, and cleans up
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    logger.info("TextGuidedSeg inference worker %d, Python %s", os.getpid(), sys.version.split()[0])
    while True:
        try:
            line = lines.get(timeout=args.idle_seconds)
        except queue.Empty:
            logger.info("no job for %.0f s: exiting", args.idle_seconds)
            return 0
        if line is None:
            return 0
        job_dir = Path(line)
        if not (job_dir / REQUEST_NAME).is_file():
            logger.error("%s is not a job folder (no %s): skipped", job_dir, REQUEST_NAME)
            continue
        running[:] = [threading.Event()]
        try:
            run_one(job_dir, running[0])
        finally:
            running.clear()
        logger.info("job %s ended", job_dir.name)


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every job has written its results and closed its events file: skip the interpreter's teardown of
    # torch and the model (seconds on a busy machine), so that the process ends as soon as it is told to.
    os._exit(status)
