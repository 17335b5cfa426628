"""lowrank.io.files against hostile and careless use: bounded memory, one-line errors, files as ``open`` makes them.

Each family checks a promise of docs/reliability.md: a hostile ``.npz``,
``.npy`` or JSON file is refused before it costs memory or recursion; the
command line turns any exception into one line and exit code 2; atomic
writes keep modes, follow links, clean the leftovers of killed writes, and
write folders as a unit.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowrank
from lowrank.cli import main
from lowrank.io.files import (
    MAX_JSON_DEPTH,
    atomic_write,
    atomic_write_folder,
    check_writable,
    load_json,
    load_npy,
    load_npz,
    save_json,
    save_npz,
)

fcntl = pytest.importorskip("fcntl", reason="temporary-file cleanup needs POSIX flock")


def run(argv, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, f"exit code {code}"
    assert err.startswith("lowrank: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def npy_header(shape, descr="<f8") -> bytes:
    """The bytes numpy writes before the data of an array of ``shape``, version 1.0."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    return f.getvalue()


# ---------------------------------------------------------------- .npz: hostile archives


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """A deflated member whose header rightly claims 64 MiB of zeros, in about 0.3 MB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    n = 64 * 2**20
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("w.npy", "w", force_zip64=True) as member:
            member.write(npy_header((n,), "|u1"))
            chunk = bytes(2**22)
            for _ in range(n // len(chunk)):
                member.write(chunk)
    assert path.stat().st_size < n // 100
    return path


def test_a_zip_bomb_is_refused_before_it_is_inflated(zip_bomb):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"member 'w.npy' is compressed .* lowrank writes uncompressed"):
            load_npz(zip_bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak:,} bytes for a refused file"


def test_a_zip_bomb_given_as_resume_is_refused_by_fit(zip_bomb):
    from lowrank import nn
    from lowrank.train import fit

    model = nn.Sequential(nn.Linear(2, 2, dtype=np.float64, random_state=0))
    X, y = np.zeros((4, 2)), np.zeros((4, 2))
    message = "bomb.npz is not a readable .npz file: member 'w.npy' is compressed"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(model, X, y, loss="mse", optimizer=nn.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=2,
            resume=zip_bomb, verbose=False)


def test_a_member_claiming_shape_2_40_is_a_value_error_not_a_memory_error(tmp_path):
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("w.npy", npy_header((2**40,)) + bytes(16))
    assert path.stat().st_size < 300
    with pytest.raises(ValueError, match=re.escape("member 'w.npy' claims shape (1099511627776,) of float64 "
                                                   "(8,796,093,022,208 bytes) but holds 16 bytes")) as info:
        load_npz(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _patch_central_size(data: bytes, size: int) -> bytes:
    """``data`` (a zip of one stored member, no zip64) with its central directory claiming ``size`` bytes."""
    at = data.rindex(b"PK\x01\x02") + 24  # the uncompressed size of the central directory entry
    return data[:at] + size.to_bytes(4, "little") + data[at + 4:]


@pytest.mark.parametrize(("shape", "descr", "data"), [
    ((2**40, 2**40), "|V0", b""),  # zero bytes claimed and held, but no array that big exists
    ((-2, -4), "|u1", bytes(8)),  # a negative product that matches the data
])
def test_a_member_with_an_impossible_shape_is_a_value_error(tmp_path, shape, descr, data):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("w.npy", npy_header(shape, descr) + data)
    with pytest.raises(ValueError, match=re.escape("odd.npz is not a readable .npz file")):
        load_npz(path)


def test_a_member_whose_claimed_size_differs_from_its_stored_size_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("w.npy", npy_header((2,)) + bytes(16))
    path = tmp_path / "lies.npz"
    path.write_bytes(_patch_central_size(buffer.getvalue(), 2**31))
    with pytest.raises(ValueError, match=r"member 'w.npy' claims 2,147,483,648 bytes but stores \d+"):
        load_npz(path)


@pytest.mark.parametrize(("content", "message"), [
    (b"junk" + b"PK\x05\x06" + bytes(18), "does not start with the zip marker"),
    (npy_header((1,)) + bytes(8), "it holds a single .npy array"),
    (b"", "does not start with the zip marker"),
])
def test_not_a_zip_archive_is_refused_by_its_first_bytes(tmp_path, content, message):
    (tmp_path / "x.npz").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_npz(tmp_path / "x.npz")


def test_a_valid_archive_behind_a_prefix_is_refused(tmp_path):
    save_npz(tmp_path / "ok.npz", {"a": np.arange(3.0)})
    (tmp_path / "prefixed.npz").write_bytes(b"MZ\x90\x00" + (tmp_path / "ok.npz").read_bytes())
    with pytest.raises(ValueError, match="does not start with the zip marker"):
        load_npz(tmp_path / "prefixed.npz")


def test_numpy_savez_is_read_and_savez_compressed_refused(tmp_path):
    arrays = {"a": np.arange(6.0).reshape(2, 3), "b": np.array(3, np.int32)}
    np.savez(tmp_path / "plain.npz", **arrays)
    back = load_npz(tmp_path / "plain.npz")
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    np.savez_compressed(tmp_path / "small.npz", **arrays)
    with pytest.raises(ValueError, match="is compressed"):
        load_npz(tmp_path / "small.npz")


def test_an_object_member_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        load_npz(tmp_path / "obj.npz")


ARRAYS = st.one_of(
    hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.dtype(">f8"), np.dtype("<c16")]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=4)).map(np.asfortranarray),
)


@given(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5), ARRAYS, max_size=3))
def test_npz_round_trip_keeps_values_dtypes_shapes(tmp_path_factory, arrays):
    path = save_npz(tmp_path_factory.mktemp("rt") / "a.npz", arrays)
    back = load_npz(path)
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


@pytest.fixture(scope="module")
def saved_npz(tmp_path_factory) -> bytes:
    path = save_npz(tmp_path_factory.mktemp("npz") / "a.npz", {"w": np.arange(12.0).reshape(3, 4),
                                                                   "s": np.array(2.5, np.float32)})
    return path.read_bytes()


@given(st.data())
def test_every_truncation_of_an_npz_is_a_value_error(tmp_path_factory, saved_npz, data):
    cut = data.draw(st.integers(0, len(saved_npz) - 1), label="cut")
    path = tmp_path_factory.mktemp("cut") / "a.npz"
    path.write_bytes(saved_npz[:cut])
    with pytest.raises(ValueError, match=re.escape("is not a readable .npz file")):
        load_npz(path)


@given(st.data())
def test_a_corrupted_byte_gives_the_arrays_or_a_value_error(tmp_path_factory, saved_npz, data):
    at = data.draw(st.integers(0, len(saved_npz) - 1), label="at")
    byte = data.draw(st.integers(0, 255), label="byte")
    path = tmp_path_factory.mktemp("flip") / "a.npz"
    path.write_bytes(saved_npz[:at] + bytes([byte]) + saved_npz[at + 1:])
    try:
        arrays = load_npz(path)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:  # the zip CRC guards the data: what loads is what was saved
        assert sum(a.nbytes for a in arrays.values()) <= len(saved_npz)


# ---------------------------------------------------------------- .npy and JSON, and the command line


def test_a_193_byte_npy_claiming_10e8_by_10e8_is_refused_before_allocating(tmp_path, capsys):
    path = tmp_path / "huge.npy"
    header = npy_header((10**8, 10**8))
    path.write_bytes(header + bytes(193 - len(header)))
    with pytest.raises(ValueError, match=re.escape("claims shape (100000000, 100000000) of float64")):
        load_npy(path)
    code, out, err = run(["factorize", str(path), "--rank", "1"], capsys)
    assert_one_line_error(code, err, "huge.npy", "(100000000, 100000000)")
    assert out == ""


@given(st.data())
def test_every_truncation_of_an_npy_is_a_value_error(tmp_path_factory, data):
    buffer = io.BytesIO()
    np.save(buffer, np.arange(10.0))
    content = buffer.getvalue()
    cut = data.draw(st.integers(0, len(content) - 1), label="cut")
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    path.write_bytes(content[:cut])
    with pytest.raises(ValueError, match=re.escape("is not a readable .npy file")):
        load_npy(path)


def test_load_npy_reads_what_numpy_saves(tmp_path):
    a = np.asfortranarray(np.arange(12.0).reshape(3, 4)).astype(">f4")
    np.save(tmp_path / "a.npy", a)
    back = load_npy(tmp_path / "a.npy")
    assert back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)


def test_json_nested_100000_deep_is_a_one_line_value_error(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=re.escape(f"deep.json is not a readable JSON file: it nests lists and "
                                                   f"objects deeper than {MAX_JSON_DEPTH} levels")):
        load_json(path)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "manifest.json").write_text('{"cases": ' + "{\"a\": " * 100_000 + "1" + "}" * 100_001)
    code, _, err = run(["vectors", "check", str(ref), str(tmp_path)], capsys)
    assert_one_line_error(code, err, "manifest.json", "deeper than")


def test_json_depth_counts_structure_not_brackets_in_strings(tmp_path):
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    (tmp_path / "a.json").write_text(deepest)
    assert load_json(tmp_path / "a.json") == json.loads(deepest)
    text = json.dumps({"s": "[{" * 1000, "t": '\\"[[[', "u": [["x"]]})
    (tmp_path / "b.json").write_text(text)
    assert load_json(tmp_path / "b.json") == json.loads(text)
    (tmp_path / "c.json").write_text('["abc' + "[" * 100)  # never ends: the parser's error, not a depth
    with pytest.raises(ValueError, match="Unterminated string"):
        load_json(tmp_path / "c.json")


@given(st.data())
def test_every_truncation_of_a_saved_json_is_a_value_error(tmp_path_factory, data):
    obj = {"b": [1, 2.5, None, {"c": "x[y"}], "a": "quote \" and brace {"}
    path = save_json(tmp_path_factory.mktemp("json") / "a.json", obj)
    content = path.read_bytes()
    cut = data.draw(st.integers(0, len(content) - 2), label="cut")  # the last byte is an optional newline
    path.write_bytes(content[:cut])
    with pytest.raises(ValueError, match="is not a readable JSON file"):
        load_json(path)


def test_any_exception_from_a_command_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    np.save(tmp_path / "m.npy", np.eye(3))
    argv = ["factorize", str(tmp_path / "m.npy"), "--rank", "1"]

    def boom(*args, **kwargs):
        raise AttributeError("left\nright")

    monkeypatch.setattr(lowrank, "truncated_svd", boom)
    monkeypatch.delenv("LOWRANK_DEBUG", raising=False)
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "AttributeError: left right", "this is a bug in lowrank, please report it")
    monkeypatch.setenv("LOWRANK_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(argv)


@pytest.mark.parametrize(("exc", "code", "line"), [
    (MemoryError("Unable to allocate 8 PiB"), 2, "lowrank: error: out of memory: Unable to allocate 8 PiB\n"),
    (RuntimeError("backward before forward"), 2, "lowrank: error: backward before forward\n"),
    (KeyboardInterrupt(), 130, "lowrank: interrupted\n"),
])
def test_memory_runtime_errors_and_ctrl_c(capsys, monkeypatch, tmp_path, exc, code, line):
    np.save(tmp_path / "m.npy", np.eye(3))

    def raise_it(*args, **kwargs):
        raise exc

    monkeypatch.setattr(lowrank, "truncated_svd", raise_it)
    monkeypatch.delenv("LOWRANK_DEBUG", raising=False)
    assert run(["factorize", str(tmp_path / "m.npy"), "--rank", "1"], capsys)[::2] == (code, line)


def test_a_closed_output_pipe_ends_quietly_with_141():
    # `lowrank ... | head`: the reader is gone before the command writes; no error line, no
    # "Exception ignored" from the interpreter's final flush
    cmd = [sys.executable, "-m", "lowrank", "precision", "bound", "--shape", "2,3,4,1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert (proc.wait(timeout=60), err) == (141, b"")


# ---------------------------------------------------------------- output paths, checked before the work


def test_check_writable_names_each_failure(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_writable(tmp_path / "new.npz", "--out") == tmp_path / "new.npz"
    assert check_writable(str(tmp_path / "dir"), "out", folder=True) == tmp_path / "dir"
    with pytest.raises(ValueError, match=re.escape("--out must be a path, got ''")):
        check_writable("", "--out")
    with pytest.raises(TypeError, match=r"--out must be a path .* got int"):
        check_writable(3, "--out")
    with pytest.raises(FileNotFoundError, match=r"cannot write --out '.*/missing/x.npz': the folder .* does not"):
        check_writable(tmp_path / "missing" / "x.npz", "--out")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "x.npz", "--out")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        check_writable(tmp_path / "dir", "--out")
    with pytest.raises(NotADirectoryError, match="it is a file, not a folder"):
        check_writable(tmp_path / "file", "out", folder=True)
    with pytest.raises(ValueError, match="neither a regular file nor a folder"):
        check_writable("/dev/null", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(PermissionError, match="is not writable"):
        check_writable(tmp_path / "ro" / "x.npz", "--out")


def test_factorize_checks_out_before_the_work(capsys, monkeypatch, tmp_path):
    np.save(tmp_path / "m.npy", np.eye(3))
    calls = []
    monkeypatch.setattr(lowrank, "truncated_svd", lambda *a, **k: calls.append(a))
    for out, fragment in [("", "--out must be a path, got ''"),
                          (str(tmp_path / "missing" / "f.npz"), "does not exist"),
                          (str(tmp_path), "it is a folder")]:
        code, stdout, err = run(["factorize", str(tmp_path / "m.npy"), "--rank", "1", "--out", out], capsys)
        assert_one_line_error(code, err, fragment)
        assert stdout == ""
    assert calls == []


@pytest.mark.parametrize(("plot", "fragment"), [("", "--plot must be a path, got ''"), (".", "it is a folder")])
def test_demo_checks_plot_before_the_work(capsys, monkeypatch, plot, fragment):
    import lowrank.demo

    calls = []
    monkeypatch.setattr(lowrank.demo, "run_demo", lambda **k: calls.append(k))
    code, out, err = run(["demo", "--quick", "--plot", plot], capsys)
    assert_one_line_error(code, err, fragment)
    assert out == "" and calls == []


# ---------------------------------------------------------------- atomic writes: modes, links, leftovers


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_new_file_and_folder_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    save_json(tmp_path / "a.json", {"a": 1})
    atomic_write_folder(tmp_path / "d", lambda folder: (folder / "x").write_text("x"))
    with open(tmp_path / "by_open", "wb"):
        pass
    assert mode(tmp_path / "a.json") == mode(tmp_path / "by_open") == 0o666 & ~mask
    assert mode(tmp_path / "d") == 0o777 & ~mask


@pytest.mark.parametrize("old_mode", [0o644, 0o640, 0o444, 0o600])
def test_overwriting_keeps_the_mode(tmp_path, umask, old_mode):
    umask(0o077)
    path = tmp_path / "a.npz"
    path.write_bytes(b"old")
    os.chmod(path, old_mode)
    save_npz(path, {"a": np.ones(2)})
    assert mode(path) == old_mode
    np.testing.assert_array_equal(load_npz(path)["a"], np.ones(2))


def test_writing_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "a.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    link = tmp_path / "a.json"
    link.symlink_to(target)
    assert save_json(link, {"b": 2}) == link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == {"b": 2} and mode(target) == 0o640
    dangling = tmp_path / "b.json"
    dangling.symlink_to(tmp_path / "real" / "b.json")
    save_json(dangling, [1])
    assert dangling.is_symlink() and json.loads((tmp_path / "real" / "b.json").read_text()) == [1]
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match="symbolic links form a loop"):
        save_json(loop, [])


def test_writing_onto_a_folder_or_a_pipe_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        atomic_write(tmp_path, lambda f: f.write(b"x"))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="neither a regular file nor a folder"):
        save_json(tmp_path / "pipe", {})
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def _age(path: Path, seconds: float = 60.0) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_leftovers_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    stale = [tmp_path / ".a.json.k3_x9q2z.tmp", tmp_path / ".a.json.0123abcd.tmp"]
    kept = [tmp_path / ".a.json.0123abc.tmp",  # not lowrank's pattern: 7 characters
            tmp_path / ".b.json.0123abcd.tmp",  # another target's
            tmp_path / "a.json.0123abcd.tmp",  # no leading dot
            tmp_path / ".a.json.0123abcd.tmp.bak"]
    young = tmp_path / ".a.json.fedc4321.tmp"  # could be a writer that has not locked yet
    locked = tmp_path / ".a.json.77777777.tmp"  # a live writer's
    for path in [*stale, *kept, young, locked]:
        path.write_bytes(b"partial")
    for path in [*stale, *kept, locked]:
        _age(path)
    with open(locked, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        save_json(tmp_path / "a.json", {"a": 1})
        assert locked.exists()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in [*kept, young])


def test_a_killed_writer_leaves_a_leftover_that_the_next_write_removes(tmp_path):
    child = textwrap.dedent(f"""
        import sys, time
        from lowrank.io.files import atomic_write, atomic_write_folder
        def stall(f):
            f.write(b"half")
            print("writing", flush=True)
            time.sleep(60)
        if sys.argv[1] == "file":
            atomic_write({str(tmp_path / "a.bin")!r}, stall)
        else:
            atomic_write_folder({str(tmp_path / "d")!r}, lambda d: stall(open(d / "x", "wb")))
    """)
    (tmp_path / "a.bin").write_bytes(b"old")
    atomic_write_folder(tmp_path / "d", lambda d: (d / "x").write_bytes(b"old"))
    for kind, suffix in (("file", ".tmp"), ("folder", ".tmpdir")):
        proc = subprocess.Popen([sys.executable, "-c", child, kind], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "writing\n"
        proc.kill()
        proc.wait()
        proc.stdout.close()
        (leftover,) = (p for p in tmp_path.iterdir() if p.name.endswith(suffix))
        assert (tmp_path / "a.bin").read_bytes() == b"old" and (tmp_path / "d" / "x").read_bytes() == b"old"
        _age(leftover)  # the writer died a minute ago
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"new"))
    atomic_write_folder(tmp_path / "d", lambda d: (d / "x").write_bytes(b"new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "d"]


# ---------------------------------------------------------------- folders as a unit


def test_atomic_write_folder_replaces_the_unit_and_keeps_other_entries(tmp_path):
    target = tmp_path / "adapter"
    atomic_write_folder(target, lambda d: [(d / n).write_text(f"v1 {n}") for n in ("w", "c")])
    (target / "README.md").write_text("mine")
    (target / "notes").mkdir()
    (target / "notes" / "n.txt").write_text("n")
    os.chmod(target, 0o750)
    assert atomic_write_folder(target, lambda d: [(d / n).write_text(f"v2 {n}") for n in ("w", "c")]) == target
    assert {p.name: p.read_text() for p in target.iterdir() if p.is_file()} == {
        "w": "v2 w", "c": "v2 c", "README.md": "mine"}
    assert (target / "notes" / "n.txt").read_text() == "n" and mode(target) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failing_folder_write_leaves_the_old_folder_and_no_leftover(tmp_path):
    target = tmp_path / "d"
    atomic_write_folder(target, lambda d: (d / "w").write_text("old"))

    def half(folder):
        (folder / "w").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(target, half)
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        atomic_write_folder(tmp_path / "f", lambda d: None)


def test_a_crash_between_the_renames_is_cleaned_by_the_next_write(tmp_path):
    # state 2 of the docstring: nothing at the target, the old unit in .old, the new one in .tmpdir
    for name, content in ((".d.aaaaaaaa.old", "old"), (".d.bbbbbbbb.tmpdir", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_text(content)
        _age(tmp_path / name)
    atomic_write_folder(tmp_path / "d", lambda d: (d / "w").write_text("newer"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert (tmp_path / "d" / "w").read_text() == "newer"


def test_every_test_named_in_the_reliability_doc_exists():
    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", (root / "docs" / "reliability.md").read_text()))
    defined = {m for f in root.glob("tests/**/*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert named and named <= defined, sorted(named - defined)


def test_concurrent_writers_never_leave_a_mixed_unit_or_a_leftover(tmp_path):
    import threading

    target = tmp_path / "unit"
    mixed, errors = [], []

    def writer(k):
        try:
            for i in range(15):
                atomic_write_folder(target, lambda d, tag=f"{k}.{i}": [(d / n).write_text(tag) for n in ("w", "c")])
                save_json(tmp_path / "a.json", {"k": k, "i": i})
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    def read(folder_fd, name):
        with open(name, opener=lambda path, flags: os.open(path, flags, dir_fd=folder_fd)) as f:
            return f.read()

    def reader(stop):  # opens the folder once, as a consistent reader must (paths read one by one can
        while not stop.is_set():  # straddle a swap that happens between them)
            try:
                folder_fd = os.open(target, os.O_RDONLY)
            except FileNotFoundError:  # between the two renames, or before the first write
                continue
            try:
                w, c = read(folder_fd, "w"), read(folder_fd, "c")
            except FileNotFoundError:  # the old folder, removed after its swap
                continue
            finally:
                os.close(folder_fd)
            if w != c:
                mixed.append((w, c))

    stop = threading.Event()
    watch = threading.Thread(target=reader, args=(stop,))
    watch.start()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    assert errors == [] and mixed == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "unit"]
    assert sorted(p.name for p in target.iterdir()) == ["c", "w"]
