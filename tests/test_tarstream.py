"""mmcat.data.tarstream (the loader's shard reader) yields exactly what webdataset's ``tarfile_samples`` yields --
samples, member bytes, keys, and the errors its handler is given -- on plain shards and on every kind of tar the
fast path hands back to webdataset: pax / GNU long names, folders, links, compressed, truncated, damaged, empty."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import webdataset as wds

from mmcat.data.tarstream import tarfile_samples


def member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **kw: Any) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, len(data) if kind == tarfile.REGTYPE else 0, 946684800
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def plain_members() -> List[Tuple[str, bytes]]:
    """What mmcat pack writes (key.jpg/.txt/.cls/.json), plus the key rules webdataset has: ./ prefixes, dotted
    folders, keys that start with __, __meta__ members (skipped), a member of 0 bytes and one of exactly 512."""
    out = []
    for i in range(5):
        out += [(f"p{i:04d}.cls", str(i % 3).encode()), (f"p{i:04d}.jpg", bytes(range(256)) * (i * 7 + 1)),
                (f"p{i:04d}.json", b'{"a": %d}' % i), (f"p{i:04d}.txt", f"title {i}\ndescription".encode())]
    return out + [("./q1.cls", b"1"), ("./q1.txt", b""), ("v1.2/p2.cls", b"2"), ("v1.2/p2.jpg", b"x" * 512),
                  ("__meta__", b"m"), ("__k3.cls", b"0"), ("__k3.txt", b"t"), ("dir/__meta__/x.cls", b"0")]


def write_tar(path: Path, members: List[Tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT,
              extra: Optional[Callable[[tarfile.TarFile], None]] = None, at: int = -1) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, (name, data) in enumerate(members):
            if i == at and extra:
                extra(tar)
            member(tar, name, data)
    return path


def read_both(path: Path, select: Optional[Callable[[str], bool]] = None) -> Tuple[List[Dict], List[Dict]]:
    """(webdataset's result, mmcat's result): the samples, then one entry per error the handler saw."""
    def run(reader: Callable[[Callable[[Exception], bool]], Any]) -> List[Dict]:
        errors: List[Dict] = []

        def handler(exn: Exception) -> bool:
            errors.append({"error": type(exn).__name__, "message": str(exn.args[0]).split(" @ ")[0]})
            return True

        return [dict(s) for s in reader(handler)] + errors

    theirs = run(lambda h: wds.tarfile_samples(iter([{"url": str(path)}]), handler=h, select_files=select))
    ours = run(lambda h: tarfile_samples(str(path), h, select))
    return theirs, ours


def test_plain_shard_same_samples_and_tarfile_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tar(tmp_path / "plain.tar", plain_members())
    theirs, ours = read_both(path)
    assert ours == theirs and len(ours) == 9 and ours[0]["jpg"] == bytes(range(256)) * 1
    assert {s["__key__"] for s in ours} >= {"./q1", "v1.2/p2", "__k3", "p0004"}
    assert not any("__meta__" in s for s in ours)
    only = lambda name: name.endswith((".cls", ".txt"))  # noqa: E731 -- the loader's member selection
    theirs, ours = read_both(path, only)
    assert ours == theirs and all("jpg" not in s and "json" not in s for s in ours)

    def no_tarfile(*a: Any, **k: Any) -> None:
        raise AssertionError("the fast path parsed a header with tarfile")

    monkeypatch.setattr(tarfile.TarInfo, "frombuf", classmethod(no_tarfile))
    assert [dict(s) for s in tarfile_samples(str(path), lambda exn: False, only)] == ours  # not one header via tarfile


LONG = "a-very-long-folder-name/" * 6 + "p0001"  # > 100 characters: ustar prefix field, GNU 'L' or a pax header


@pytest.mark.parametrize("case", ["pax", "gnu_longname", "ustar_prefix", "pax_unicode", "folder", "symlink",
                                  "gzip", "signed_checksum"])
def test_handed_to_webdataset_same_result(tmp_path: Path, case: str) -> None:
    members = plain_members()
    path = tmp_path / "shard.tar"
    if case == "pax":
        write_tar(path, members, tarfile.PAX_FORMAT, lambda t: member(t, "x.txt", b"y", pax_headers={"c": "d"}), 6)
    elif case in ("gnu_longname", "ustar_prefix"):
        fmt = tarfile.GNU_FORMAT if case == "gnu_longname" else tarfile.USTAR_FORMAT
        write_tar(path, members[:6] + [(LONG + ".cls", b"1"), (LONG + ".txt", b"t")] + members[6:], fmt)
    elif case == "pax_unicode":
        write_tar(path, members[:6] + [("ürün.cls", b"1"), ("ürün.txt", "é".encode())] + members[6:],
                  tarfile.PAX_FORMAT)
    elif case == "folder":
        write_tar(path, members, extra=lambda t: member(t, "photos", kind=tarfile.DIRTYPE), at=5)
    elif case == "symlink":
        write_tar(path, members, extra=lambda t: member(t, "p0001.png", kind=tarfile.SYMTYPE,
                                                       linkname="p0001.jpg"), at=5)
    elif case == "gzip":
        raw = write_tar(tmp_path / "raw.tar", members).read_bytes()
        path = tmp_path / "shard.tar.gz"
        path.write_bytes(gzip.compress(raw))
    elif case == "signed_checksum":  # old tar writers summed signed bytes: tarfile accepts that checksum too
        raw = bytearray(write_tar(tmp_path / "raw.tar", [("p\xe9.cls".encode("latin-1").decode("latin-1"), b"1")]
                                  + members).read_bytes())
        header = raw[:512]
        signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
        raw[148:156] = b"%06o\x00 " % signed
        path.write_bytes(bytes(raw))
    theirs, ours = read_both(path)
    assert ours == theirs and len([s for s in theirs if "__key__" in s]) >= 8


def cut(path: Path, offset: int) -> Path:
    out = path.with_name(f"cut{offset}.tar")
    out.write_bytes(path.read_bytes()[:offset])
    return out


def offsets(path: Path) -> Dict[str, Tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.mark.parametrize("select", [None, "cls_txt"])
def test_truncated_and_damaged_shards_same_samples_and_errors(tmp_path: Path, select: Optional[str]) -> None:
    only = (lambda name: name.endswith((".cls", ".txt"))) if select else None
    path = write_tar(tmp_path / "full.tar", plain_members())
    at = offsets(path)
    raw = path.read_bytes()
    cases = {
        "in a selected member's data": cut(path, at["p0002.txt"][1] + 3),
        "in a member's data (skipped when selecting)": cut(path, at["p0003.jpg"][1] + 100),
        "at a header boundary, no end blocks": cut(path, at["p0003.cls"][0]),
        "inside a header": cut(path, at["p0003.cls"][0] + 100),
        "empty file": cut(path, 0),
    }
    damaged = bytearray(raw)
    damaged[at["p0002.cls"][0] + 10] ^= 0xFF  # a later header's checksum no longer matches: tarfile ends quietly
    cases["damaged later header"] = tmp_path / "damaged.tar"
    cases["damaged later header"].write_bytes(bytes(damaged))
    first = bytearray(raw)
    first[10] ^= 0xFF  # the first header: tarfile raises
    cases["damaged first header"] = tmp_path / "first.tar"
    cases["damaged first header"].write_bytes(bytes(first))
    dup = write_tar(tmp_path / "dup.tar", plain_members()[:4] + [("p0000.txt", b"again")] + plain_members()[4:])
    cases["duplicate member in a sample"] = dup
    for name, shard in cases.items():
        theirs, ours = read_both(shard, only)
        assert ours == theirs, name
    assert any("error" in e for e in read_both(cases["empty file"])[1])  # the cases do reach the handler


def test_loader_reads_through_the_fast_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loader uses this reader (its speed is the point), and its batches hold the shard's content."""
    from _shards import write_packed
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.data import build_train_loader
    from mmcat.data import tarstream
    from mmcat.models import load_tokenizer

    infos = write_packed(tmp_path, {"train": [6, 5], "val": [3]})
    calls: List[str] = []
    real = tarstream.tar_members

    def spy(stream: Any, *a: Any, **k: Any) -> Any:
        calls.append(getattr(stream, "name", "?"))
        return real(stream, *a, **k)

    monkeypatch.setattr(tarstream, "tar_members", spy)
    cfg = load_config(TrainRunConfig, None, [f"data.root={tmp_path}", "output_dir=/unused", "data.num_workers=0",
                                             "train.batch_size=4", "data.image_size=32"])
    keys = [k for b in build_train_loader(cfg, load_tokenizer(cfg.model.text), 0, 1, 0).loader for k in b["keys"]]
    assert sorted(set(keys)) == sorted(r["key"] for r in infos["train"]) and len(calls) >= 2
