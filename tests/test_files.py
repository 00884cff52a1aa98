"""gsae_fast.files: atomic writes (the old file survives any failure, no temporary left
behind, a full disk named) and the run-folder lock (a second process refused, naming the
holder; released when the holder dies, however)."""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from gsae_fast import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    files.write_json({"v": 1}, p)
    with pytest.raises(ZeroDivisionError):
        with files.atomic_write(p, "w") as f:
            f.write('{"v": 2')
            1 / 0
    assert p.read_text() == '{\n "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary left behind
    files.save_torch({"t": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["t"], torch.arange(3))
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_write(p, "a"):
            pass


def test_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    files.save_torch({"ok": 1}, p)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"no space left on device writing {p}") as e:
        files.save_torch({"ok": 2}, p)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.load(p) == {"ok": 1} and os.listdir(tmp_path) == ["ck.pt"]


def _hold(folder, seconds):
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from gsae_fast import files; "
            f"l = files.FolderLock({str(folder)!r}).acquire(); print('held', flush=True); "
            f"time.sleep({seconds})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_folder_lock_refuses_a_second_process_and_dies_with_the_holder(tmp_path):
    proc = _hold(tmp_path, 60)
    try:
        with pytest.raises(files.FolderInUseError, match=f"process {proc.pid}"):
            files.FolderLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with files.FolderLock(tmp_path) as lock:  # a killed holder leaves no stale lock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(files.FolderInUseError):
            files.FolderLock(tmp_path).acquire()  # another handle, even in this process
    lock.release()
    files.FolderLock(tmp_path).acquire().release()
