"""Checkpoint files: round trip, atomic commit, corruption detection, safe loading, rotation, resume lookup."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import (MARKER, Checkpoint, clean_leftovers, find_run_to_resume, list_checkpoints,
                                load_latest_good, prune, read_checkpoint, step_dir_name, verify,
                                write_checkpoint)
from trainer.errors import CheckpointError
from trainer.faults import Faults

FILES = {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json", MARKER}


# ---------------------------------------------------------------------------------------------- helpers


def _optimizer_state() -> dict:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    net(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    return {"optimizer": opt.state_dict()}


def make_ckpt(step: int) -> Checkpoint:
    g = torch.Generator().manual_seed(step)
    model = {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "buffer.index": torch.arange(5, dtype=torch.int64) * (step + 1),
    }
    ema = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in model.items()}
    ema["step"] = torch.tensor(step, dtype=torch.int64)
    state = {
        "step": step,
        "images_seen": step * 8,
        "data_epoch": 1,
        "data_offset": 16,
        "tracker_run_id": "run-abc",
        "config": {"train": {"lr": 0.001, "batch_size": 4, "dim_mults": [1, 2]},
                   "run": {"run_name": "tiny", "resume": None, "flags": {"nested": True}}},
    }
    return Checkpoint(model=model, ema=ema, optimizer=_optimizer_state(), state=state)


def ckpt_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / step_dir_name(step)


def save(run: Path, step: int, **kw) -> Path:
    return write_checkpoint(ckpt_path(run, step), make_ckpt(step), **kw)


def assert_same(a, b) -> None:
    """Deep equality where tensors must match exactly (dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")] if root.is_dir() else []


def rewrite_manifest_entry(folder: Path, name: str) -> None:
    """Make COMMITTED agree with the current bytes of `name` (as a forger would)."""
    marker = json.loads((folder / MARKER).read_text())
    data = (folder / name).read_bytes()
    marker["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / MARKER).write_text(json.dumps(marker, indent=2))


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path):
    ck = make_ckpt(7)
    folder = write_checkpoint(ckpt_path(tmp_path, 7), ck)
    assert folder == ckpt_path(tmp_path, 7)
    assert {p.name for p in folder.iterdir()} == FILES
    assert leftovers(tmp_path) == []

    back = read_checkpoint(folder)
    assert_same(ck.model, back.model)
    assert_same(ck.ema, back.ema)
    assert_same(ck.optimizer, back.optimizer)
    assert back.state == ck.state
    assert back.model["layer.bias"].dtype == torch.bfloat16
    assert back.model["buffer.index"].dtype == torch.int64

    # The restored optimizer state loads into a fresh optimizer.
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    opt.load_state_dict(back.optimizer["optimizer"])
    assert_same(opt.state_dict()["state"], ck.optimizer["optimizer"]["state"])

    marker = json.loads((folder / MARKER).read_text())
    assert marker["step"] == 7
    assert set(marker["files"]) == FILES - {MARKER}
    verify(folder)


def test_non_contiguous_tensors_are_saved(tmp_path):
    ck = make_ckpt(1)
    ck.model["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    back = read_checkpoint(write_checkpoint(ckpt_path(tmp_path, 1), ck))
    assert torch.equal(back.model["transposed"], ck.model["transposed"])


def test_step_dir_name():
    assert step_dir_name(0) == "step-00000000"
    assert step_dir_name(1234) == "step-00001234"
    assert step_dir_name(123456789) == "step-123456789"


def test_resave_of_same_step_replaces_it(tmp_path):
    save(tmp_path, 3)
    ck = make_ckpt(3)
    ck.state["images_seen"] = 999
    write_checkpoint(ckpt_path(tmp_path, 3), ck)
    assert read_checkpoint(ckpt_path(tmp_path, 3)).state["images_seen"] == 999
    assert leftovers(tmp_path) == []


def test_stale_tmp_folder_is_replaced_by_a_new_save(tmp_path):
    tmp = tmp_path / "checkpoints" / f".tmp-{step_dir_name(2)}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"garbage")
    save(tmp_path, 2)
    assert not tmp.exists()
    verify(ckpt_path(tmp_path, 2))


# ---------------------------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["oserror", "keyboardinterrupt"])
def test_failure_before_commit_leaves_nothing(tmp_path, exc):
    old = save(tmp_path, 1)
    before = snapshot(old)
    called = []

    def hook():
        # Every data file is already written when the hook runs; the marker is not.
        tmp = tmp_path / "checkpoints" / f".tmp-{step_dir_name(2)}"
        called.append({p.name for p in tmp.iterdir()})
        raise exc

    with pytest.raises(type(exc)):
        save(tmp_path, 2, before_commit=hook)
    assert called == [FILES - {MARKER}]
    assert leftovers(tmp_path) == []
    assert not ckpt_path(tmp_path, 2).exists()
    assert snapshot(old) == before
    assert list_checkpoints(tmp_path) == [old]


def test_failure_on_resave_keeps_the_existing_folder(tmp_path):
    old = save(tmp_path, 4)
    before = snapshot(old)

    def hook():
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        save(tmp_path, 4, before_commit=hook)
    assert snapshot(old) == before
    assert leftovers(tmp_path) == []


def test_save_error_hook_from_faults_keeps_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", "save_error@2")
    faults = Faults.from_env()
    old = save(tmp_path, 1, before_commit=faults.save_hook(1))
    with pytest.raises(OSError) as info:
        save(tmp_path, 2, before_commit=faults.save_hook(2))
    assert info.value.errno == errno.ENOSPC
    assert list_checkpoints(tmp_path) == [old]
    assert leftovers(tmp_path) == []


def _simulate_crash_leftovers(run: Path) -> tuple[Path, Path]:
    """A `.tmp-step-...` with files but no marker, and a `step-...` without COMMITTED."""
    root = run / "checkpoints"
    tmp = root / f".tmp-{step_dir_name(30)}"
    tmp.mkdir(parents=True)
    for name in FILES - {MARKER}:
        (tmp / name).write_bytes(b"partial")
    uncommitted = root / step_dir_name(20)
    uncommitted.mkdir()
    for name in FILES - {MARKER}:
        (uncommitted / name).write_bytes(b"partial")
    return tmp, uncommitted


def test_crash_between_write_and_commit(tmp_path):
    good = save(tmp_path, 10)
    tmp, uncommitted = _simulate_crash_leftovers(tmp_path)

    assert list_checkpoints(tmp_path) == [good]
    warnings = []
    found = load_latest_good(tmp_path, warn=warnings.append)
    assert found is not None and found[0] == good
    assert found[1].state["step"] == 10
    assert warnings == []

    removed = clean_leftovers(tmp_path)
    assert sorted(removed) == sorted([tmp, uncommitted])
    assert not tmp.exists() and not uncommitted.exists()
    assert good.is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]
    assert clean_leftovers(tmp_path) == []


def test_clean_leftovers_without_checkpoints_folder(tmp_path):
    assert clean_leftovers(tmp_path) == []
    assert clean_leftovers(tmp_path / "missing") == []


def test_verify_rejects_uncommitted_folder(tmp_path):
    _, uncommitted = _simulate_crash_leftovers(tmp_path)
    with pytest.raises(CheckpointError, match=MARKER):
        verify(uncommitted)
    with pytest.raises(CheckpointError):
        read_checkpoint(uncommitted)


# ---------------------------------------------------------------------------------------------- corruption


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - 3  # inside the tensor data, past the header
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected(tmp_path):
    folder = save(tmp_path, 1)
    path = folder / "model.safetensors"
    size = path.stat().st_size
    _flip_byte(path)
    assert path.stat().st_size == size
    with pytest.raises(CheckpointError, match="sha256"):
        verify(folder)
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(folder)


def test_truncated_file_is_detected(tmp_path):
    folder = save(tmp_path, 1)
    path = folder / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"bytes|truncated"):
        verify(folder)


def test_missing_file_is_detected(tmp_path):
    folder = save(tmp_path, 1)
    (folder / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify(folder)


def test_unreadable_marker_is_detected(tmp_path):
    folder = save(tmp_path, 1)
    (folder / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        verify(folder)
    (folder / MARKER).write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match="unreadable"):
        verify(folder)


def test_marker_with_damaged_key_falls_back(tmp_path):
    older = save(tmp_path, 1)
    newest = save(tmp_path, 2)
    marker = newest / MARKER
    text = marker.read_text()
    # One flipped byte inside a key name keeps the JSON valid.
    marker.write_text(text.replace('"bytes"', '"bytez"', 1))
    warnings = []
    found = load_latest_good(tmp_path, warn=warnings.append)
    assert found is not None and found[0] == older
    assert len(warnings) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state_json"])
def test_load_latest_good_falls_back_once(tmp_path, damage):
    save(tmp_path, 1)
    older = save(tmp_path, 2)
    newest = save(tmp_path, 3)
    if damage == "flip":
        _flip_byte(newest / "model.safetensors")
    elif damage == "truncate":
        (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:20])
    elif damage == "delete":
        (newest / "ema.safetensors").unlink()
    else:  # a state.json whose hash is re-recorded but which is not JSON
        (newest / "state.json").write_text("{oops")
        rewrite_manifest_entry(newest, "state.json")

    warnings = []
    found = load_latest_good(tmp_path, warn=warnings.append)
    assert found is not None
    folder, ck = found
    assert folder == older
    assert ck.state["step"] == 2
    assert_same(ck.model, make_ckpt(2).model)
    assert len(warnings) == 1
    assert str(newest) in warnings[0]


def test_load_latest_good_all_damaged(tmp_path):
    for step in (1, 2):
        _flip_byte(save(tmp_path, step) / "model.safetensors")
    warnings = []
    assert load_latest_good(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 2
    assert str(ckpt_path(tmp_path, 2)) in warnings[0]
    assert str(ckpt_path(tmp_path, 1)) in warnings[1]


def test_load_latest_good_without_checkpoints(tmp_path):
    warnings = []
    assert load_latest_good(tmp_path, warn=warnings.append) is None
    assert warnings == []


# ---------------------------------------------------------------------------------------------- safe loading


class _Shell:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _Gadget:
    """A harmless class that is not on torch's allowlist."""

    def __init__(self):
        self.value = 1


def test_malicious_optimizer_pickle_is_not_executed(tmp_path):
    folder = save(tmp_path / "run", 1)
    pwned = tmp_path / "pwned"
    torch.save({"optimizer": {"state": _Shell(str(pwned))}}, folder / "optimizer.pt")
    assert b"system" in (folder / "optimizer.pt").read_bytes()
    rewrite_manifest_entry(folder, "optimizer.pt")
    verify(folder)  # the hashes match: only the loader stands in the way

    with pytest.raises(CheckpointError, match="optimizer.pt") as refused:
        read_checkpoint(folder)
    assert not pwned.exists()
    message = str(refused.value)
    assert "refused for safety" in message and "system" in message and "unless you trust" in message
    assert "will likely succeed" not in message  # not torch's advice to retry unsafely

    warnings = []
    assert load_latest_good(tmp_path / "run", warn=warnings.append) is None
    assert len(warnings) == 1
    assert not pwned.exists()


def test_non_allowlisted_class_is_refused(tmp_path):
    folder = save(tmp_path, 1)
    torch.save({"optimizer": _Gadget()}, folder / "optimizer.pt")
    rewrite_manifest_entry(folder, "optimizer.pt")
    with pytest.raises(CheckpointError, match="safely"):
        read_checkpoint(folder)


# ---------------------------------------------------------------------------------------------- listing and pruning


def _fake_committed(run: Path, name: str) -> Path:
    p = run / "checkpoints" / name
    p.mkdir(parents=True)
    (p / MARKER).write_text("{}")
    return p


def test_list_checkpoints_sorts_numerically(tmp_path):
    names = ["step-00000010", "step-00000009", "step-00000100", "step-123456789", "step-99999999",
             "step-00000002"]
    for n in names:
        _fake_committed(tmp_path, n)
    # Things that are not committed checkpoints.
    (tmp_path / "checkpoints" / "step-00000050").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-00000060").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    (tmp_path / "checkpoints" / "step-abc").mkdir()
    (tmp_path / "checkpoints" / "step-abc" / MARKER).write_text("{}")

    got = [p.name for p in list_checkpoints(tmp_path)]
    assert got == ["step-00000002", "step-00000009", "step-00000010", "step-00000100", "step-99999999",
                   "step-123456789"]


def test_list_checkpoints_of_missing_run(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []
    assert list_checkpoints(tmp_path) == []


def test_prune_keeps_newest(tmp_path):
    folders = [_fake_committed(tmp_path, step_dir_name(s)) for s in (1, 2, 9, 10, 11)]
    uncommitted = tmp_path / "checkpoints" / step_dir_name(0)
    uncommitted.mkdir()

    removed = prune(tmp_path, keep=3)
    assert removed == folders[:2]  # oldest first
    assert list_checkpoints(tmp_path) == folders[2:]
    assert uncommitted.is_dir()  # prune leaves uncommitted folders to clean_leftovers

    assert prune(tmp_path, keep=3) == []
    assert list_checkpoints(tmp_path) == folders[2:]


@pytest.mark.parametrize("keep", [1, 0, -5])
def test_prune_never_keeps_fewer_than_two(tmp_path, keep):
    folders = [_fake_committed(tmp_path, step_dir_name(s)) for s in (5, 6, 7, 8)]
    assert prune(tmp_path, keep=keep) == folders[:2]
    assert list_checkpoints(tmp_path) == folders[2:]


def test_prune_with_few_checkpoints_removes_nothing(tmp_path):
    assert prune(tmp_path, keep=2) == []
    only = _fake_committed(tmp_path, step_dir_name(1))
    assert prune(tmp_path, keep=1) == []
    assert list_checkpoints(tmp_path) == [only]


# ---------------------------------------------------------------------------------------------- --resume lookup


def test_find_run_latest_picks_newest_checkpoint(tmp_path):
    results = tmp_path / "results"
    a = results / "a"
    b = results / "b"
    a1, a2 = _fake_committed(a, step_dir_name(1)), _fake_committed(a, step_dir_name(2))
    b1 = _fake_committed(b, step_dir_name(50))
    (results / "empty-run").mkdir()
    (results / "stray.txt").write_text("x")

    os.utime(a1, (1_000, 1_000))
    os.utime(a2, (3_000, 3_000))
    os.utime(b1, (2_000, 2_000))
    assert find_run_to_resume("latest", results) == (a, None)

    os.utime(b1, (4_000, 4_000))
    assert find_run_to_resume("latest", results) == (b, None)

    # Only each run's newest checkpoint counts, not an older one with a later mtime.
    os.utime(a1, (9_000, 9_000))
    assert find_run_to_resume("latest", results) == (b, None)


def test_find_run_checkpoint_folder(tmp_path):
    run = tmp_path / "results" / "r"
    save(run, 1)
    folder = save(run, 2)
    assert find_run_to_resume(str(folder), tmp_path / "results") == (run, folder)
    assert find_run_to_resume(str(folder) + "/", tmp_path / "results") == (run, folder)


def test_find_run_run_folder(tmp_path):
    run = tmp_path / "results" / "r"
    save(run, 1)
    assert find_run_to_resume(str(run), tmp_path / "results") == (run, None)


def test_find_run_relative_checkpoint_folder(tmp_path, monkeypatch):
    run = tmp_path / "r"
    folder = save(run, 1)
    monkeypatch.chdir(run / "checkpoints")
    got_run, got_folder = find_run_to_resume(folder.name, tmp_path)
    assert got_run.resolve() == run.resolve()
    assert got_folder.resolve() == folder.resolve()


def test_find_run_errors_name_resume(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume("latest", results)  # empty results_path
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume("latest", tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume(str(tmp_path / "no-such-run"), results)

    run = results / "bare"
    run.mkdir()
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume(str(run), results)  # run folder without checkpoints
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume("latest", results)  # a run exists, but has no checkpoint

    # Only uncommitted leftovers: still nothing to resume.
    _simulate_crash_leftovers(run)
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume(str(run), results)
    with pytest.raises(CheckpointError, match="--resume"):
        find_run_to_resume("latest", results)


# ---------------------------------------------------------------------------------------------- fault injection


def test_faults_from_env(monkeypatch):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", "nan_loss@3,save_error@5,crash_before_commit@7")
    f = Faults.from_env()
    assert f.at == {"nan_loss": frozenset({3}), "save_error": frozenset({5}),
                    "crash_before_commit": frozenset({7})}
    assert f("nan_loss", 3) and not f("nan_loss", 4) and not f("save_error", 3)
    assert f("save_error", 5) and f("crash_before_commit", 7)
    # Transient: each (kind, step) strikes once per process, so a rollback past step 3 does not meet it again.
    assert not f("nan_loss", 3)


def test_faults_whitespace_and_repeats(monkeypatch):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", " nan_loss@3 , nan_loss@4,,save_error@3 ")
    f = Faults.from_env()
    assert f.at == {"nan_loss": frozenset({3, 4}), "save_error": frozenset({3})}


@pytest.mark.parametrize("value", [None, "", "  ", ","])
def test_faults_off_by_default(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("EDDY_INJECT_FAULTS", raising=False)
    else:
        monkeypatch.setenv("EDDY_INJECT_FAULTS", value)
    f = Faults.from_env()
    assert f.at == {}
    assert not f("nan_loss", 0)
    assert f.save_hook(0) is None


@pytest.mark.parametrize("spec", ["nan_loss", "nan_loss@", "@3", "bogus@3", "nan_loss@x", "nan_loss@-1",
                                  "nan_loss@1.5", "nan_loss@3@4", "nan_loss=3", "nan_loss@3,save_error"])
def test_faults_reject_malformed(monkeypatch, spec):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", spec)
    with pytest.raises(ValueError, match="EDDY_INJECT_FAULTS"):
        Faults.from_env()


def test_faults_save_hook(monkeypatch):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", "nan_loss@3,save_error@5,crash_before_commit@7")
    f = Faults.from_env()
    fail = f.save_hook(5)
    assert callable(fail)
    with pytest.raises(OSError) as info:
        fail()
    assert info.value.errno == errno.ENOSPC
    assert callable(f.save_hook(7))  # not called: it ends the process
    for step in (0, 3, 4, 6, 8):
        assert f.save_hook(step) is None


def test_resaving_a_step_swaps_the_folder_atomically(tmp_path):
    """A re-save of an existing step (after resuming from an older checkpoint) replaces it whole, and a
    crash between the two renames puts the old one back instead of losing both."""
    first = save(tmp_path, 4)
    old_bytes = (first / "model.safetensors").read_bytes()
    second = write_checkpoint(ckpt_path(tmp_path, 4), make_ckpt(5))  # other weights, same step folder
    assert second == first and (second / "model.safetensors").read_bytes() != old_bytes
    assert not list(first.parent.glob(".old-*")) and not list(first.parent.glob(".tmp-*"))

    # Crash after the old folder was moved aside, before the new one was renamed into place.
    os.replace(second, second.parent / f".old-{second.name}")
    (second.parent / f".tmp-{second.name}").mkdir()
    clean_leftovers(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == [second.name]
    verify(second)
    assert not list(second.parent.glob(".old-*")) and not list(second.parent.glob(".tmp-*"))
