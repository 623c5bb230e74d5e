"""Atomic, validated checkpoints: one folder per save, committed by a marker, rotated after commit.

Layout of a run folder:

    run/checkpoints/step-00001000/
        model.safetensors      network weights
        ema.safetensors        EMA network weights
        optimizer.pt           optimizer (and grad scaler) state, loadable with weights_only=True
        state.json             counters (step, images seen, data position, EMA step), tracker run id, config
        COMMITTED              written last: sha256 and size of every file above

A save writes into `.tmp-step-...`, fsyncs every file, writes COMMITTED, then renames the folder
into place, so a crash at any moment leaves either the complete new checkpoint or nothing that
resume would take. Old checkpoints are pruned only after the new one is committed. On resume the
newest committed checkpoint whose files match their recorded hashes is taken; a damaged one is
reported and the one before it is used.

All decisions are made on the main process and broadcast, so every rank loads the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError
from trainer.parallel.base import main_decides

MARKER = "COMMITTED"
BEST = "best"  # checkpoints/best: the best by the run's evaluation metric, beside the newest ones
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """What a checkpoint holds, as plain tensors, numbers and strings."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_write(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(folder: Path, ckpt: Checkpoint, before_commit: Callable[[], None] | None = None) -> Path:
    """Write `ckpt` atomically as `folder`. Returns the folder.

    On any error the temporary folder is removed and the error re-raised; nothing at `folder` changes.
    `before_commit` runs after the files are written and before the marker (fault injection).
    """
    tmp = folder.parent / f".tmp-{folder.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        files = {
            "model.safetensors": lambda p: save_file(_contiguous(ckpt.model), str(p)),
            "ema.safetensors": lambda p: save_file(_contiguous(ckpt.ema), str(p)),
            "optimizer.pt": lambda p: torch.save(ckpt.optimizer, p),
            "state.json": lambda p: p.write_text(json.dumps(ckpt.state, indent=2)),
        }
        manifest = {}
        for name, write in files.items():
            _fsync_write(tmp / name, write)
            manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        if before_commit is not None:
            before_commit()
        marker = {"step": ckpt.state.get("step"), "files": manifest}
        _fsync_write(tmp / MARKER, lambda p: p.write_text(json.dumps(marker, indent=2)))
        _fsync_dir(tmp)
        old = folder.parent / f".old-{folder.name}"
        if folder.exists():  # a re-save of a step (after resuming from an older checkpoint): swap it out
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def verify(folder: Path) -> None:
    """Raise CheckpointError unless `folder` is committed and every file matches its recorded hash."""
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder} has no {MARKER} marker: it was never completed.")
    try:
        manifest = {name: (int(info["bytes"]), str(info["sha256"]))
                    for name, info in json.loads(marker.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{marker} is unreadable ({type(e).__name__}: {e}): the checkpoint is damaged.") from None
    for name, (size, digest) in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing.")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, expected {size} (truncated?).")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path} does not match its recorded sha256 (corrupted).")


def read_checkpoint(folder: Path) -> Checkpoint:
    """Load a verified checkpoint. Nothing is unpickled as arbitrary objects."""
    verify(folder)
    try:
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(unsafe_file_message(folder / "optimizer.pt", e)) from None
    return Checkpoint(
        model=load_file(str(folder / "model.safetensors")),
        ema=load_file(str(folder / "ema.safetensors")),
        optimizer=optimizer,
        state=json.loads((folder / "state.json").read_text()),
    )


def unsafe_file_message(path: Path, error: Exception) -> str:
    """Eddy's words for a file that torch's safe loader refused, in place of torch's advice to retry unsafely."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return (f"{path} was refused for safety: it could not be loaded safely, because besides tensors and numbers "
                f"it holds a reference to {found.group(1)}, code that would run when the file is loaded. Eddy "
                f"never runs such code; do not load this file any other way (such as torch.load with "
                f"weights_only=False) unless you trust where it came from. A checkpoint Eddy wrote never holds "
                f"code: resume from an earlier one.")
    return f"{path} could not be loaded safely (only tensors, numbers and plain containers are read): {error}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint folders of a run, oldest first."""
    ckpt_root = run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove temporary and uncommitted folders left by a crash. Returns what was removed.

    A checkpoint swapped out for a re-save of its step (`.old-step-*`) is put back if the crash came
    before the new one was in place, and removed otherwise."""
    ckpt_root = run_dir / "checkpoints"
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".old-*"):
            target = ckpt_root / p.name[len(".old-"):]
            if not (target / MARKER).is_file() and (p / MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(p, target)
        for p in ckpt_root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) or (_STEP_DIR.match(p.name) and not (p / MARKER).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints (never fewer than 2 are kept)."""
    keep = max(2, keep)
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _newest_passing(run_dir: Path, check: Callable[[Path], Any], warn: Callable[[str], None]):
    """(folder, check(folder)) for the newest committed checkpoint that passes `check`; the damaged
    ones before it are reported and skipped."""
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, check(folder)
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            warn(f"checkpoint {folder} is damaged and is skipped: {e}")
    return None


def load_latest_good(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint of `run_dir` that verifies and loads."""
    return _newest_passing(run_dir, read_checkpoint, warn)


def newest_run(results_path: Path) -> Path | None:
    """The run folder under `results_path` whose newest committed checkpoint is the most recent."""
    runs = [p for p in results_path.iterdir() if p.is_dir() and list_checkpoints(p)] if results_path.is_dir() else []
    return max(runs, key=lambda p: list_checkpoints(p)[-1].stat().st_mtime) if runs else None


def find_run_to_resume(resume: str, results_path: Path, flag: str = "--resume") -> tuple[Path, Path | None]:
    """Resolve `latest`, a run folder, its checkpoints/ folder or a checkpoint folder to
    (run folder, the checkpoint folder named, or None for 'the newest intact one').

    `flag` names the argument in messages (`--resume` for training, `CHECKPOINT` for sampling)."""
    if resume == "latest":
        newest = newest_run(results_path)
        if newest is None:
            raise CheckpointError(f"{flag} latest: no run with a checkpoint under --results_path {results_path}. "
                                  f"Point --results_path at the folder of your runs, or name a run folder.")
        return newest, None
    path = Path(resume).resolve()
    if not path.exists():
        raise CheckpointError(f"{flag} {resume}: no such run or checkpoint folder.")
    if not path.is_dir():
        raise CheckpointError(f"{flag} {resume} is a file: name a run folder or a checkpoint folder "
                              f"(.../checkpoints/step-XXXXXXXX), not one of its files.")
    if (path / MARKER).is_file() or _STEP_DIR.match(path.name):
        return path.parent.parent, path
    if path.name == "checkpoints" and list_checkpoints(path.parent):
        path = path.parent
    if not list_checkpoints(path):
        raise CheckpointError(f"{flag} {resume}: this folder holds no committed checkpoint "
                              f"(expected {path}/checkpoints/step-*/{MARKER}).")
    return path, None


def newest_intact(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest committed checkpoint whose files match their manifest, without loading it."""
    found = _newest_passing(run_dir, verify, warn)
    return found and found[0]


def load_weights_checked(module: torch.nn.Module, sd: dict[str, torch.Tensor], name: str, hint: str,
                         load: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
    """Strict `load_state_dict` whose error names the keys that are missing, unexpected or mis-shaped.
    `load` replaces `module.load_state_dict` once the keys are checked (a sharded module loads otherwise)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        few = lambda keys: f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"  # noqa: E731
        parts = [f"missing {few(missing)}"] * bool(missing) + [f"unexpected {few(unexpected)}"] * bool(unexpected)
        if shapes:
            parts.append("shape of " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                 for k in shapes[:5]))
        raise CheckpointError(f"{name} does not fit this model: {'; '.join(parts)}. {hint}")
    if load is not None:
        load(sd)
    else:
        module.load_state_dict(sd, strict=True)


class CheckpointManager:
    """The checkpoints of one run folder, as every rank of a run sees them.

    `save` writes and commits on the main process, then prunes; `latest_good` and `load` read a checkpoint
    on every rank, the main process choosing which and verifying it first. Every method is called on
    every rank, and every rank learns the same outcome.
    """

    def __init__(self, run_dir: Path, keep: int, *, is_main: bool, say: Callable[[str], None] = print,
                 before_commit: Callable[[int], Callable[[], None] | None] | None = None,
                 after_commit: Callable[[Path, int, bool], None] | None = None):
        self.run_dir, self.keep, self.is_main, self.say = run_dir, keep, is_main, say
        self.before_commit = before_commit or (lambda step: None)
        # Called on the main process with (folder, step, best) once a checkpoint is committed (an upload, say);
        # its failure is reported and never undoes the save.
        self.after_commit = after_commit

    def save(self, step: int, ckpt: Checkpoint | None, *, best: bool = False) -> bool:
        """Commit `ckpt` (the main process's; None on the others) as the checkpoint of `step`, or with `best`
        as `checkpoints/best`, which pruning never touches. A failed write keeps the previous checkpoints;
        every rank gets the same outcome."""

        def write() -> str | None:
            try:
                write_checkpoint(self.run_dir / "checkpoints" / (BEST if best else step_dir_name(step)), ckpt,
                                 before_commit=self.before_commit(step))
                if not best:
                    prune(self.run_dir, self.keep)
            except OSError as e:
                kept = list_checkpoints(self.run_dir)
                return (f"saving the checkpoint of step {step} failed ({e}); "
                        f"{'the newest intact one is ' + kept[-1].name if kept else 'no earlier checkpoint exists'}. "
                        f"Training goes on and the next save tries again.")
            return None

        failure = main_decides(write, self.is_main)
        if failure is not None:
            self.say(f"WARNING: {failure}")
        elif self.is_main and self.after_commit is not None:
            folder = self.run_dir / "checkpoints" / (BEST if best else step_dir_name(step))
            try:
                self.after_commit(folder, step, best)
            except Exception as e:  # noqa: BLE001 - the checkpoint is safe on disk whatever the hook does
                self.say(f"WARNING: the checkpoint of step {step} is saved in {folder}, but what follows a save "
                         f"failed: {type(e).__name__}: {e}")
        return failure is None

    def latest_good(self) -> tuple[Path, Checkpoint] | None:
        """The newest checkpoint that verifies and loads, damaged ones reported and skipped; None if none."""
        found: list[tuple[Path, Checkpoint] | None] = [None]

        def choose() -> str | None:
            found[0] = load_latest_good(self.run_dir, warn=lambda m: self.say(f"WARNING: {m}"))
            return found[0] and str(found[0][0])

        folder = main_decides(choose, self.is_main)
        if folder is None:
            return None
        return found[0] or (Path(folder), read_checkpoint(Path(folder)))

    def load(self, folder: Path) -> Checkpoint:
        """The checkpoint in `folder`, verified on the main process first (a damaged one raises on every rank)."""
        read: list[Checkpoint | None] = [None]

        def verify_and_read() -> None:
            read[0] = read_checkpoint(folder)

        main_decides(verify_and_read, self.is_main)
        return read[0] or read_checkpoint(folder)
