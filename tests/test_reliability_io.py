"""Outputs behave like files (issue 10, items 2, 4, 5, 7 and the stale-temp part of 14).

Full disks are real: a small tmpfs is mounted where the tests run as root (CI does), else
the writing subprocess runs under an ``RLIMIT_FSIZE`` file-size limit, which fails writes
with ``EFBIG`` much as a full disk fails them with ``ENOSPC``. Writers that can crash the
interpreter (HDF5) always run in a subprocess, so a segmentation fault fails the test
instead of killing pytest.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from credanno import stores
from credanno._atomic import atomic_path, remove_stale_parts
from credanno.errors import CredannoError
from credanno.synthetic import synthetic_features, synthetic_images, synthetic_table

ROOT = Path(__file__).resolve().parents[1]


# -- a small filesystem ---------------------------------------------------------------------

class SmallFS:
    """A folder with little space: a tmpfs mount, or (no mount allowed) a file-size limit."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        path.mkdir()
        ok = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True).returncode == 0
        self.mounted = ok
        self.limit: int | None = None

    def leave_free(self, nbytes: int) -> None:
        """Fill the filesystem until about ``nbytes`` are free (or limit file sizes)."""
        if not self.mounted:
            self.limit = nbytes
            return
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with open(self.path / "filler", "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, free - nbytes))

    def run(self, code: str, *args: str) -> subprocess.CompletedProcess:
        """Run Python ``code`` in a subprocess (under the file-size limit, if any)."""
        limit = self.limit

        def preexec() -> None:
            if limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                              capture_output=True, text=True, timeout=180, env=env,
                              preexec_fn=preexec)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("import sys; from credanno.cli import main; main(sys.argv[1:])", *args)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    fs = SmallFS(tmp_path / "small", 4 << 20)
    yield fs
    fs.close()


def _parts(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def _assert_space_error(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: not enough disk space for {path}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _table(n_nodules: int = 40):
    return synthetic_table(n_nodules=n_nodules, per_nodule=3, seed=0)


def _store(path: Path, dim: int = 16, n_nodules: int = 40) -> Path:
    table = _table(n_nodules)
    return stores.save(path, features={"cls": synthetic_features(table, dim=dim)},
                       table=table, provenance={"source": "synthetic"})


# -- item 2: a full disk is one line, exit 2, no temp file, the old file intact --------------

def test_full_disk_patch_file_is_one_line_and_no_crash(small_fs):
    """HDF5 2.0 segfaulted in H5Fclose when the disk filled (prepare exited 139)."""
    out = small_fs.path / "patches.h5"
    small_fs.leave_free(300_000)
    proc = small_fs.run("""
        import sys
        from credanno.cli import main
        from credanno.data.patchfile import write_patch_file
        from credanno.errors import CredannoError
        from credanno.synthetic import synthetic_images, synthetic_table
        t = synthetic_table(n_nodules=150, per_nodule=3, seed=0)
        try:
            write_patch_file(sys.argv[1], synthetic_images(t), t, {"source": "synthetic"})
        except CredannoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        """, str(out))
    _assert_space_error(proc, out)
    assert not out.exists() and _parts(small_fs.path) == []


def test_full_disk_embed_overwrite_keeps_old_store(small_fs, tiny_patch_file):
    out = small_fs.path / "store.h5"
    _store(out, dim=4)
    before = out.read_bytes()
    small_fs.leave_free(20_000)
    proc = small_fs.cli("embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
                        "--out", str(out), "--quiet")
    _assert_space_error(proc, out)
    assert out.read_bytes() == before and _parts(small_fs.path) == []


def test_full_disk_embed_views_error_is_not_masked_by_close(small_fs, tiny_patch_file):
    """The space error was hidden behind HDF5's close() error."""
    out = small_fs.path / "views.h5"
    proc = small_fs.cli("embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
                        "--out", str(out), "--quiet", "--views", "100000")
    _assert_space_error(proc, out)
    assert not out.exists() and _parts(small_fs.path) == []


def test_full_disk_during_store_close(small_fs):
    """Space runs out after the last row, while the writer closes the file."""
    out = small_fs.path / "late.h5"
    small_fs.leave_free(2 << 20)
    proc = small_fs.run("""
        import sys, os
        from credanno import stores
        from credanno.errors import CredannoError
        from credanno.synthetic import synthetic_features, synthetic_table
        t = synthetic_table(n_nodules=40, per_nodule=3, seed=0)
        w = stores.create(sys.argv[1], t, {"cls": 16}, {"source": "synthetic"})
        w.append({"cls": synthetic_features(t, dim=16)})
        filler = os.path.join(os.path.dirname(sys.argv[1]), "filler2")
        with open(filler, "wb") as f:   # the disk fills up (another process, say)
            try:
                while True:
                    f.write(b"\\0" * 65536)
                    f.flush()
            except OSError:
                pass
        try:
            w.close()
        except CredannoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        """, str(out))
    if not small_fs.mounted:
        pytest.skip("needs a real filesystem that fills up (tmpfs as root)")
    _assert_space_error(proc, out)
    assert not out.exists() and _parts(small_fs.path) == []


def test_full_disk_knn_predictions_and_tsne_out(small_fs, tmp_path):
    store = _store(tmp_path / "s.h5")
    small_fs.leave_free(2_000)
    pred = small_fs.path / "pred.csv"
    proc = small_fs.cli("knn", "--store", str(store), "--k", "5", "--seeds", "0-0",
                        "--predictions", str(pred))
    _assert_space_error(proc, pred)
    assert not pred.exists() and _parts(small_fs.path) == []
    png = small_fs.path / "map.png"
    proc = small_fs.cli("tsne", "--store", str(store), "--out", str(png), "--perplexity", "5",
                        "--no-cache")
    _assert_space_error(proc, png)
    assert not png.exists() and _parts(small_fs.path) == []


def test_full_disk_checkpoint_keeps_previous(small_fs):
    ckpt = small_fs.path / "checkpoint.pt"
    ckpt.write_bytes(b"previous")
    small_fs.leave_free(50_000)
    proc = small_fs.run("""
        import sys, torch
        from credanno.pretrain.checkpoint import save_checkpoint
        from credanno.errors import CredannoError
        state = {"epoch": 1, "config": {}, "backbone": {"arch": "x", "kwargs": {}},
                 "teacher_backbone": {"w": torch.zeros(200_000)}, "student_backbone": {},
                 "eval_transform": {}}
        try:
            save_checkpoint(sys.argv[1], state)
        except CredannoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        """, str(ckpt))
    _assert_space_error(proc, ckpt)
    assert ckpt.read_bytes() == b"previous" and _parts(small_fs.path) == []


# -- item 4: modes as a plain open() gives them -------------------------------------------

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_outputs_get_umask_mode(tmp_path, umask_027):
    from credanno.data.patchfile import write_patch_file

    table = _table()
    store = _store(tmp_path / "s.h5")
    patches = write_patch_file(tmp_path / "p.h5", synthetic_images(table), table, {})
    with atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("a\n")
    for path in (store, patches, tmp_path / "out.csv"):
        assert _mode(path) == 0o640, (path, oct(_mode(path)))


def test_overwrite_keeps_target_mode(tmp_path):
    target = tmp_path / "r.csv"
    target.write_text("old\n")
    os.chmod(target, 0o604)
    with atomic_path(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and _mode(target) == 0o604


# -- item 5: devices and FIFOs are written through, symlinks followed ----------------------

def test_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with atomic_path(fifo, option="--csv") as p:
        assert p == fifo
        p.write_text("a,b\n1,2\n")
    reader.join(timeout=10)
    assert got == [b"a,b\n1,2\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _parts(tmp_path) == []


def test_char_device_is_written_through_not_replaced(tmp_path):
    before = os.stat("/dev/null")
    with atomic_path("/dev/null") as p:
        p.write_text("discarded\n")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino
    assert not [n for n in os.listdir("/dev") if n.endswith(".part")]


def test_regular_file_under_dev_shm_is_still_atomic(tmp_path):
    """Only devices, FIFOs and the process's streams are written through, not every /dev path."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    target = shm / f"credanno-test-{os.getpid()}.csv"
    try:
        with atomic_path(target) as tmp:
            assert tmp != target and tmp.parent == shm
            tmp.write_text("x\n")
        assert target.read_text() == "x\n"
    finally:
        target.unlink(missing_ok=True)


def test_dev_full_is_one_line_space_error():
    with pytest.raises(CredannoError, match=r"not enough disk space for /dev/full"):
        with atomic_path("/dev/full", option="--csv") as p, open(p, "w") as f:
            f.write("x" * 100_000)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_cli_csv_to_dev_stdout_writes_through(tmp_path):
    store = _store(tmp_path / "s.h5")
    proc = subprocess.run(
        [sys.executable, "-m", "credanno", "knn", "--store", str(store), "--k", "5",
         "--seeds", "0-0", "--json", "--csv", "/dev/stdout"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "method,label,k,frac,seed" in proc.stdout.replace('"', "")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "data" / "real.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        assert tmp.parent == real.parent  # the rename happens on the target's filesystem
        tmp.write_text("new\n")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new\n" and _parts(real.parent) == []


def test_dangling_symlink_creates_target(tmp_path):
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "made.csv")
    with atomic_path(link) as tmp:
        tmp.write_text("x\n")
    assert link.is_symlink() and (tmp_path / "made.csv").read_text() == "x\n"


# -- item 7: bad output folders are one line ----------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "credanno", *args], capture_output=True,
                          text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def _assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_out_under_a_file_and_too_long_name(tmp_path, tiny_patch_file):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    proc = _cli("embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
                "--out", str(blocker / "s.h5"), "--quiet")
    _assert_one_line(proc, "not a folder", "--out")
    for args in (("pretrain", "--data", str(tiny_patch_file), "--epochs", "1"), ("demo",)):
        proc = _cli(*args, "--out", str(blocker / "sub"))
        _assert_one_line(proc, str(blocker), "--out")
    long_name = tmp_path / ("n" * 300 + ".h5")
    proc = _cli("embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
                "--out", str(long_name), "--quiet")
    _assert_one_line(proc, "file name too long", "--out")
    assert blocker.read_text() == "x"


def test_out_on_read_only_filesystem(tmp_path, tiny_patch_file):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
            capture_output=True).returncode != 0:
        os.chmod(ro, 0o555)  # not root: plain permissions do the same job
    try:
        for args in (("embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
                      "--out", str(ro / "s.h5"), "--quiet"),
                     ("pretrain", "--data", str(tiny_patch_file), "--out", str(ro / "run"),
                      "--epochs", "1"),
                     ("demo", "--data", str(tiny_patch_file), "--out", str(ro / "demo"))):
            proc = _cli(*args)
            _assert_one_line(proc, str(ro), "--out")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        os.chmod(ro, 0o755)


def test_immutable_target_is_one_line(tmp_path, tiny_patch_file):
    out = tmp_path / "s.h5"
    _store(out, dim=4)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext2/3/4, xfs, btrfs)")
    try:
        before = out.read_bytes()
        proc = _cli("embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
                    "--out", str(out), "--quiet")
        _assert_one_line(proc, str(out), "--out")
        assert out.read_bytes() == before and _parts(tmp_path) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)


# -- item 14: stale temp files of dead writers are removed --------------------------------

def test_stale_parts_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "s.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from credanno import _atomic

    stale = tmp_path / f".s.h5.{_atomic._HOST}-{dead.pid}-abcdef.part"
    live = tmp_path / f".s.h5.{_atomic._HOST}-{os.getppid()}-abcdef.part"
    other_host = tmp_path / f".s.h5.zzzzzz-{dead.pid}-abcdef.part"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert not stale.exists() and live.exists() and other_host.exists()
    assert target.read_bytes() == b"done"
    assert remove_stale_parts(target) == []


def test_traceback_switch_shows_traceback(tmp_path):
    proc = _cli("--traceback", "knn", "--store", str(tmp_path / "missing.h5"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = _cli("knn", "--store", str(tmp_path / "missing.h5"))
    _assert_one_line(proc, "missing.h5")

