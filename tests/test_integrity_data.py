"""Issue 22, the data path: every member and row accounted for, checksummed parts, names that
round-trip through every CSV, --save-inputs on a full disk. Each test fails with the bug it pins."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import imagefolders as datasets
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pa = pytest.importorskip("pyarrow", reason="the sharded stages need the [scale] extra (pyarrow)")
pq = pytest.importorskip("pyarrow.parquet")

from itae_export.cli.cluster import main as cluster_cli  # noqa: E402
from itae_export.cli.embed import main as embed_cli  # noqa: E402
from itae_export.cli.search import main as search_cli  # noqa: E402
from itae_export.data import shards as sh  # noqa: E402
from itae_export.data.outputs import (collection_file, csv_bytes, csv_text, parse_csv, read_csv,  # noqa: E402
                                      read_outputs)
from itae_export.data.sources import index_tar, open_source  # noqa: E402
from itae_export.engines.local import embed_shards  # noqa: E402
from itae_export.errors import InputError  # noqa: E402
from itae_export.images import PreprocessSpec, pil_resize, preprocess  # noqa: E402
from itae_export.onnx.manifest import read_manifest  # noqa: E402
from itae_export.search.session import read_feedback, write_ranked  # noqa: E402

PNG_FILES = 20


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity") / "photos"
    datasets.fashion_folder(root, per_class=2)  # 20 images
    return sorted(root.rglob("*.png"))


def _member(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def _tar(path: Path, pngs, extra=()) -> Path:
    """img2dataset's layout: NNNNNNNNN.png + .json per sample, then ``extra`` (name, data, attrs) members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i, f in enumerate(pngs):
            _member(tf, f"{i:09d}.png", f.read_bytes())
            _member(tf, f"{i:09d}.json", json.dumps({"key": f"{i:09d}"}).encode())
        for name, data, attrs in extra:
            _member(tf, name, data, **attrs)
    return path


def _run(*argv):
    r = CliRunner().invoke(embed_cli, [str(a) for a in argv])
    assert "Traceback" not in r.output, r.output
    return r


def _footer(path: Path) -> dict:
    meta = pq.read_schema(path).metadata
    return {"skipped": json.loads(meta[sh.SKIPPED_KEY]), "accounting": json.loads(meta[sh.ACCOUNTING_KEY])}


def _accounted(out: Path, n_parts: int) -> list[tuple[int, dict, list]]:
    """Each part's (vectors, accounting, skipped), checked to add up to its items."""
    res = []
    for pid in range(n_parts):
        f = _footer(out / sh.part_name(pid))
        n = pq.read_metadata(out / sh.part_name(pid)).num_rows
        assert n + len(f["skipped"]) == f["accounting"]["items"], (pid, n, f)
        res.append((n, f["accounting"], f["skipped"]))
    return res


# ---------------------------------------------------------------- 1. every member accounted for


def test_a_tar_cut_in_half_names_what_is_lost_and_its_part_is_never_complete(pngs, tiny_model, tmp_path):
    whole = _tar(tmp_path / "whole" / "00000.tar", pngs)
    data = whole.read_bytes()
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    # img2dataset's parquet beside the tar lists the samples it holds: the lost ones are named
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(PNG_FILES)], "status": ["success"] * PNG_FILES}),
                   cut.with_suffix(".parquet"))
    out = tmp_path / "shards"
    r = _run("run", cut.parent, "--out", out, "--onnx", tiny_model, "-q")
    assert r.exit_code == 1 and "part 0 is incomplete" in r.output and "end-of-archive" in r.output, r.output
    [(n, acc, skipped)] = _accounted(out, 1)
    assert 0 < n < PNG_FILES and acc["unaccounted"]
    reasons = dict(skipped)
    assert "members after" in reasons["00000.tar"]  # the tar itself: what is lost after which member
    assert any("the tar ends inside this member" in r for r in reasons.values())  # the member it ends in
    named = sorted(k for k, r in reasons.items() if "lost with the end of the tar" in r)
    assert named and named == [f"00000.tar/{i:09d}" for i in range(PNG_FILES - len(named), PNG_FILES)]
    assert n + len([r for r in reasons.values() if "ends inside" in r]) + len(named) == PNG_FILES  # all 20 named
    plan = sh.read_manifest(out)["plan_id"]
    assert sh.part_status(out, 0, plan)[0] == "incomplete" and not sh.part_complete(out, 0, plan)
    r = _run("status", out)
    assert r.exit_code == 1 and "incomplete part 0" in r.output and "0 of 1 parts" in r.output, r.output
    with pytest.raises(InputError, match="incomplete"):
        sh.open_shards(out)
    assert sh.open_shards(out, allow_partial=True).n == n
    # the same cut tar again: nothing more to do, the same outcome (never reported complete)
    assert _run("run", cut.parent, "--out", out, "--onnx", tiny_model, "-q").exit_code == 1
    # the tar fetched again, whole: the same shard directory, the part is embedded again and complete
    cut.write_bytes(data)
    r = _run("run", cut.parent, "--out", out, "--onnx", tiny_model, "-q")
    assert r.exit_code == 0 and f"{PNG_FILES} embedded" in r.output, r.output
    assert sh.part_status(out, 0, plan) == ("complete", None) and _run("status", out).exit_code == 0
    assert sh.open_shards(out).n == PNG_FILES


def test_a_corrupt_member_header_loses_the_members_after_it_with_a_reason(pngs, tmp_path):
    t = _tar(tmp_path / "00000.tar", pngs[:6])
    with tarfile.open(t) as tf:
        third = tf.getmembers()[4]  # the header of sample 2's image
    raw = bytearray(t.read_bytes())
    raw[third.offset + 100] ^= 0xFF  # inside the header: its checksum no longer matches
    t.write_bytes(bytes(raw))
    ix = index_tar(str(t))
    assert ix.lost and "corrupt member header" in ix.lost and "000000001.json" in ix.lost
    assert [it.key for it in ix.items if it.skip is None] == ["00000.tar/000000000", "00000.tar/000000001"]
    assert ix.items[-1].key == "00000.tar" and ix.items[-1].skip == ix.lost


SPECIAL = [
    ("link.png", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "a symbolic link to '/etc/passwd'"),
    ("hard.png", {"type": tarfile.LNKTYPE, "linkname": "000000000.png"}, "a hard link"),
    ("dev.png", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, "a character device"),
    ("blk.png", {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0}, "a block device"),
    ("fifo.png", {"type": tarfile.FIFOTYPE}, "a FIFO"),
]


@pytest.mark.parametrize("name,attrs,reason", SPECIAL, ids=[s[0] for s in SPECIAL])
def test_links_devices_and_fifos_get_a_skipped_line(pngs, tmp_path, name, attrs, reason):
    ix = index_tar(str(_tar(tmp_path / "00000.tar", pngs[:2], [(name, b"", attrs)])))
    skipped = {it.key: it.skip for it in ix.items if it.skip}
    assert list(skipped) == [f"00000.tar/{name}"] and reason in skipped[f"00000.tar/{name}"]
    assert ix.lost is None and len(ix.items) == 3


def test_duplicates_second_images_hidden_files_and_imageless_samples_each_get_a_line(pngs, tmp_path):
    png = pngs[0].read_bytes()
    extra = [("000000000.png", pngs[5].read_bytes(), {}),  # the same member name again (tar -r)
             ("000000001.jpg", png, {}),  # a second image of sample 1
             ("._000000002.png", b"AppleDouble", {}),  # macOS metadata
             ("lonely.json", b"{}", {})]  # a sample with no image
    ix = index_tar(str(_tar(tmp_path / "00000.tar", pngs[:3], extra)))
    skipped = [(it.key, it.skip) for it in ix.items if it.skip]
    assert [k for k, _ in skipped] == ["00000.tar/000000000.png", "00000.tar/000000001.jpg",
                                       "00000.tar/._000000002.png", "00000.tar/lonely"]
    assert "a second member of this name" in skipped[0][1] and "second image of sample" in skipped[1][1]
    assert "hidden" in skipped[2][1] and "no image in this sample (members: lonely.json)" in skipped[3][1]
    embedded = [it for it in ix.items if it.skip is None]
    assert len(embedded) == 3 and embedded[0].read() == png  # the first copy is the one embedded


def test_one_junk_tar_among_three_does_not_stop_the_shard(pngs, tiny_model, tmp_path):
    wds = tmp_path / "wds"
    _tar(wds / "00000.tar", pngs[:4])
    (wds / "00001.tar").write_bytes(b"this is not a tar at all " * 40)
    _tar(wds / "00002.tar", pngs[4:8])
    out = tmp_path / "shards"
    r = _run("run", wds, "--out", out, "--onnx", tiny_model, "-q")
    assert r.exit_code == 1 and "part 1 is incomplete" in r.output, r.output
    counts = _accounted(out, 3)
    assert [c[0] for c in counts] == [4, 0, 4]
    assert counts[1][2][0][0] == "00001.tar" and "not a readable uncompressed tar" in counts[1][2][0][1]
    plan = sh.read_manifest(out)["plan_id"]
    assert [sh.part_status(out, i, plan)[0] for i in range(3)] == ["complete", "incomplete", "complete"]


LIST_ROWS = [
    ("l.txt", lambda ps: "\n".join([ps[0], "", ps[1]]) + "\n\n", "l.txt:row 2", "an empty row"),
    ("l.csv", lambda ps: f"path\n{ps[0]}\n\"\"\n{ps[1]}\n", "l.csv:row 2", "an empty row"),
    ("l.parquet", [0, None, 1], "l.parquet:row 2", "a null value"),
]


@pytest.mark.parametrize("name,content,key,reason", LIST_ROWS, ids=[r[0] for r in LIST_ROWS])
def test_empty_and_null_rows_of_a_list_get_a_skipped_line(pngs, tiny_model, tmp_path, name, content, key, reason):
    lst = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"path": [None if i is None else str(pngs[i]) for i in content]}), lst)
    else:
        lst.write_text(content([str(p) for p in pngs[:2]]))
    items = open_source(lst).parts[0].items()
    assert [(it.key, it.skip) for it in items if it.skip] == [(key, items[1].skip)] and reason in items[1].skip
    out = tmp_path / "shards"
    stats = embed_shards(lst, out, tiny_model, progress=False)
    assert (stats.embedded, stats.skipped) == (2, 1)
    [(n, acc, skipped)] = _accounted(out, 1)
    assert (n, acc["items"], skipped) == (2, 3, [[key, items[1].skip]])


def test_counts_that_do_not_add_up_are_an_error(tmp_path):
    vec = np.ones((2, 4), np.float32)
    with pytest.raises(InputError, match="2 vectors \\+ 1 skipped is not the 4 items"):
        sh.write_part(tmp_path, 0, [0, 1], ["a", "b"], vec, plan_id="p", model_id="m", skipped=[("c", "x")],
                      n_items=4)
    assert not list(tmp_path.iterdir())
    sh.write_part(tmp_path, 0, [0, 1], ["a", "b"], vec, plan_id="p", model_id="m", skipped=[("c", "x")])
    assert sh.part_status(tmp_path, 0, "p") == ("complete", None)
    # a footer whose accounting was edited (one skipped line dropped): not complete, said why
    t = pq.read_table(tmp_path / sh.part_name(0))
    meta = dict(t.schema.metadata)
    meta[sh.ACCOUNTING_KEY] = json.dumps({"items": 4, "embedded": 2, "skipped": 1, "unaccounted": None}).encode()
    pq.write_table(t.replace_schema_metadata(meta), tmp_path / sh.part_name(0))
    state, why = sh.part_status(tmp_path, 0, "p")
    assert state == "corrupt" and "do not add up" in why


# ---------------------------------------------------------------- 2. checksummed parts


@pytest.fixture(scope="module")
def shard_dir(pngs, tiny_model, tmp_path_factory):
    """A written shard directory of 2 parts (10 images each) and its vectors."""
    base = tmp_path_factory.mktemp("parts")
    lst = base / "l.txt"
    lst.write_text("\n".join(map(str, pngs)) + "\n")
    out = base / "shards"
    embed_shards(lst, out, tiny_model, part_size=10, progress=False)
    return lst, out, sh.open_shards(out).load_all().copy()


def _copy(shard_dir, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(shard_dir[1], dst)
    return dst


def _flip_vector_bytes(path: Path, vectors: np.ndarray) -> None:
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(vectors[3].tobytes())
    assert at > 0
    raw[at + 5] ^= 0x40  # one bit of one float of the fourth vector
    path.write_bytes(bytes(raw))


def _break_page_header(path: Path) -> None:
    col = pq.ParquetFile(path).metadata.row_group(0).column(2)  # the vector column
    raw = bytearray(path.read_bytes())
    for i in range(col.data_page_offset, col.data_page_offset + 6):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _nan_part(path: Path, plan_id: str) -> None:
    """The part rewritten with a NaN in one vector, its digest recomputed (a writer without the check)."""
    t = pq.read_table(path)
    meta = dict(t.schema.metadata)
    vecs = np.stack(t.column("vector").to_pylist()).astype(np.float32)
    vecs[2, 1] = np.nan
    idx, keys = t.column("idx").to_numpy(), t.column("key").to_pylist()
    meta[sh.DIGEST_KEY] = sh.part_digest(idx, keys, vecs).encode()
    pq.write_table(sh.part_table(idx, keys, vecs).replace_schema_metadata(meta), path)


DAMAGE = {"flipped vector bytes": lambda p, v, plan: _flip_vector_bytes(p, v),
          "corrupt page header": lambda p, v, plan: _break_page_header(p),
          "a NaN vector": lambda p, v, plan: _nan_part(p, plan)}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_part_is_refused_in_one_line_and_embedded_again(shard_dir, tiny_model, tmp_path, damage):
    lst, _, vectors = shard_dir
    out = _copy(shard_dir, tmp_path)
    plan = sh.read_manifest(out)["plan_id"]
    part = out / sh.part_name(1)
    DAMAGE[damage](part, vectors[10:], plan)
    assert sh.part_status(out, 0, plan) == ("complete", None)
    state, why = sh.part_status(out, 1, plan)
    assert state == "corrupt", why
    with pytest.raises(InputError, match=f"{sh.part_name(1)}: corrupt"):
        sh.open_shards(out)
    r = _run("cluster", out, "--k", "2")
    assert r.exit_code == 1 and sh.part_name(1) in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sh.open_shards(out, allow_partial=True).missing == [1]
    r = _run("status", out)
    assert r.exit_code == 1 and "damaged part 1: corrupt" in r.output, r.output
    # the next run embeds that part again; the result is the original
    stats = embed_shards(lst, out, tiny_model, part_size=10, progress=False)
    assert (stats.parts_done_before, stats.parts_written, stats.embedded) == (1, 1, 10)
    np.testing.assert_array_equal(sh.open_shards(out).load_all(), vectors)


def test_part_complete_checks_the_plan_id(shard_dir):
    out = shard_dir[1]
    plan = sh.read_manifest(out)["plan_id"]
    assert sh.part_complete(out, 0, plan)
    assert not sh.part_complete(out, 0, "sha256:" + "0" * 64)
    assert sh.part_status(out, 0, "sha256:" + "0" * 64)[0] == "foreign"


@pytest.mark.parametrize("name", ["../x.parquet", "/etc/passwd", "part-00001.parquet", "sub/part-00000.parquet"])
def test_a_manifest_never_points_outside_the_shard_folder(shard_dir, tmp_path, name):
    out = _copy(shard_dir, tmp_path)
    m = json.loads((out / sh.MANIFEST).read_text())
    m["parts"][0]["file"] = name
    (out / sh.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InputError, match="refused"):
        sh.open_shards(out, allow_partial=True)
    r = _run("status", out)
    assert r.exit_code == 1 and "refused" in r.output


# ---------------------------------------------------------------- 3. names with any character, through every CSV

CELLS = ["plain.png", "a\rb.png", "c\nd.png", "e\r\nf.png", 'q"u,o.png', "'real.png", "''two.png", "'=x.png",
         "'", "=1+1", "+x.png", "-x.png", "@SUM(A1).png", "\ttab.png", "\rcr.png", "a/=b.png", "",
         os.fsdecode(b"latin1-\xe9.png")]


def test_every_cell_round_trips_and_formulas_are_neutralised():
    raw = csv_bytes(["path", "score"], [(c, -0.25) for c in CELLS])
    back = parse_csv(raw.decode("utf-8", "surrogateescape"))
    assert [r["path"] for r in back] == CELLS and {r["score"] for r in back} == {"-0.25"}
    lines = raw.decode("utf-8", "surrogateescape")
    for formula in ("=1+1", "+x.png", "-x.png", "@SUM(A1).png", "\ttab.png"):
        assert f"\n'{formula}," in lines  # one leading apostrophe: a spreadsheet shows text, runs nothing
    assert "\n'\rcr.png" not in lines and '\n"\'\rcr.png"' in lines  # quoted, since it holds a \r
    assert "\n''real.png," in lines and "\n'''two.png," in lines  # a real apostrophe is doubled, not lost
    assert ",-0.25\n" in lines  # numbers are data, never neutralised


def test_names_with_any_character_survive_cluster_report_and_search(tmp_path, tiny_model):
    root = tmp_path / "imgs"
    names = ["a\rb.png", "c\nd.png", 'q"u,o.png', "'real.png", "@at.png", "=x.png", "-y.png"]
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in [f"{i:02d}.png" for i in range(6)] + names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name)
    out = tmp_path / "out"
    r = CliRunner().invoke(cluster_cli, [str(root), "--k", "2", "--onnx", str(tiny_model), "--out", str(out),
                                         "--report", "--quiet", "--workers", "1"])
    assert r.exit_code == 0, r.output
    rows = read_outputs(out)["rows"]
    assert set(names) <= {row["path"] for row in rows}
    raw = (out / "assignments.csv").read_bytes()
    assert b"\n'@at.png," in raw and b"\n'=x.png," in raw and b"\n''real.png," in raw and b'"a\rb.png"' in raw
    r = CliRunner().invoke(search_cli, ["query", str(out), "--like", "a\rb.png", "-k", "3", "--output",
                                        str(tmp_path / "ranked.csv")])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output

    ranked = read_csv(tmp_path / "ranked.csv")
    assert len(ranked) == 3 and all(row["path"] in {x["path"] for x in rows} for row in ranked)


def test_ranked_lists_and_feedback_files_round_trip_any_name(tmp_path):
    names = ["a\rb.png", "'real.png", "@at.png", "-1.png"]
    write_ranked([(n, 1.0 - i) for i, n in enumerate(names)], tmp_path / "r.csv", "csv")

    assert [r["path"] for r in read_csv(tmp_path / "r.csv")] == names
    rows = [(n, "-" if i % 2 else "+") for i, n in enumerate(names)]
    (tmp_path / "fb.csv").write_text(csv_text(["path", "label"], rows), newline="")
    assert read_feedback(tmp_path / "fb.csv") == {n: i % 2 == 0 for i, n in enumerate(names)}


# ---------------------------------------------------------------- 4. --save-inputs on a full disk, and the uint8 images


@pytest.fixture(scope="module")
def cluster_out(tiny_model, tmp_path_factory):
    """A finished itae-cluster output folder of 6 images of different sizes."""
    base = tmp_path_factory.mktemp("save_inputs")
    root = base / "photos"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 50 + 3 * i, 3), dtype=np.uint8)).save(root / f"{i}.png")
    out = base / "out"
    r = CliRunner().invoke(cluster_cli, [str(root), "--k", "2", "--onnx", str(tiny_model), "--out", str(out),
                                         "--quiet", "--workers", "1", "--save-inputs-rgb"])
    assert r.exit_code == 0, r.output
    return root, out


def test_save_inputs_rgb_holds_the_decoded_and_the_resized_images(cluster_out, tiny_model):
    root, out = cluster_out
    pre = PreprocessSpec.from_manifest(read_manifest(tiny_model)["preprocessing"])
    paths = [r["path"] for r in read_csv(out / "assignments.csv")]
    flat, shapes = np.load(out / "decoded_rgb.npy"), np.load(out / "decoded_rgb_shapes.npy")
    resized, px = np.load(out / "resized_rgb.npy"), np.load(out / "pixel_values.npy")
    assert flat.dtype == resized.dtype == np.uint8 and shapes.shape == (6, 2) and resized.shape == (6, 56, 56, 3)
    at = 0
    for i, p in enumerate(paths):
        img = Image.open(root / p).convert("RGB")
        h, w = shapes[i]
        np.testing.assert_array_equal(flat[at:at + h * w * 3].reshape(h, w, 3), np.asarray(img))
        at += h * w * 3
        np.testing.assert_array_equal(resized[i], np.asarray(pil_resize(img, pre)))
        np.testing.assert_array_equal(px[i], preprocess(Image.fromarray(resized[i]), pre))
    assert at == len(flat)



@pytest.mark.parametrize("rgb", [False, True], ids=["save-inputs", "save-inputs-rgb"])
def test_save_inputs_on_a_full_disk_is_one_line_and_leaves_nothing(cluster_out, tmpfs, rgb):
    out = tmpfs / "out"
    out.mkdir()
    for name in ("summary.json", "assignments.csv", "embeddings.npy", "skipped.csv"):
        shutil.copy(cluster_out[1] / name, out / name)
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "ballast").write_bytes(b"\0" * (free - 40_000))  # pixel_values.npy needs 225,920 bytes
    code = ("import sys\nfrom itae_export.errors import ITAEError\nfrom itae_export.cluster.tensors import "
            "write_inputs_and_masks\ntry:\n    write_inputs_and_masks(sys.argv[1], images=sys.argv[2] == '1')\n"
            "except ITAEError as e:\n    print(e, file=sys.stderr)\n    sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code, str(out), "1" if rgb else "0"], capture_output=True, text=True)
    assert r.returncode == 1, (r.returncode, r.stderr)  # not -7 (SIGBUS: a memory map on a full disk)
    assert len(r.stderr.strip().splitlines()) == 1 and "the disk is full" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["assignments.csv", "embeddings.npy", "skipped.csv",
                                                     "summary.json"]  # no .npy.tmp, no half file


def test_hostile_members_never_end_in_a_traceback(pngs, tiny_model, tmp_path):
    """A sparse member, a member declaring more bytes than an image may hold, a name that is not
    UTF-8: each has an outcome, and the shard is written."""
    wds = tmp_path / "wds"
    t = _tar(wds / "00000.tar", pngs[:2], [("sparse.png", b"", {"type": tarfile.GNUTYPE_SPARSE})])
    with tarfile.open(wds / "00001.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        _member(tf, "caf\xe9.png", pngs[2].read_bytes())
    ix = index_tar(str(t))
    assert [it.skip for it in ix.items if it.skip] == [
        "a sparse member (its bytes are not stored whole), not an image file"]
    big = _tar(tmp_path / "big" / "00000.tar", pngs[:1])
    raw = bytearray(big.read_bytes())
    with tarfile.open(big) as tf:
        m = tf.getmembers()[0]
    raw[m.offset + 124:m.offset + 136] = b"%011o\0" % (3 << 30)  # size: 3 GiB (the header's checksum fixed below)
    raw[m.offset + 148:m.offset + 156] = b" " * 8
    raw[m.offset + 148:m.offset + 156] = b"%06o\0 " % sum(raw[m.offset:m.offset + 512])
    big.write_bytes(bytes(raw))
    ix = index_tar(str(big))
    assert "above the 1024 MiB" in ix.items[0].skip and ix.lost is not None
    out = tmp_path / "shards"
    r = _run("run", wds, "--out", out, "--onnx", tiny_model, "-q")
    assert r.exit_code == 0, r.output
    keys = sh.open_shards(out).keys()
    assert len(keys) == 3 and "00001.tar/caf\\xe9" in keys  # the name's bytes, as text_key writes them


@pytest.mark.parametrize("manifest", ['[1, 2]', '{"format": "itae-shards/1"}',
                                      '{"format": "itae-shards/1", "plan_id": "x", "model": {}, "parts": 3}'])
def test_a_forged_manifest_is_one_line(tmp_path, manifest):
    (tmp_path / sh.MANIFEST).write_text(manifest)
    r = _run("status", tmp_path)
    assert r.exit_code == 1 and r.output.startswith("Error:") and len(r.output.strip().splitlines()) == 1, r.output


FORGED = {
    "summary.json is a list": ("summary.json", b"[1, 2]", "not an itae-cluster summary"),
    "summary lists ../x": ("summary.json", None, "not a file of an itae-cluster output set"),
    "embeddings.npy is not an array": ("embeddings.npy", b"not numpy", "not a readable .npy array"),
    "embeddings.npy holds objects": ("embeddings.npy", None, "not a readable .npy array"),
    "assignments.csv has no path": ("assignments.csv", b"name,cluster\nx,1\n", "no 'path' column"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_output_folder_is_one_line(cluster_out, tmp_path, case):
    out = tmp_path / "out"
    shutil.copytree(cluster_out[1], out)
    name, data, needle = FORGED[case]
    summary = json.loads((out / "summary.json").read_text())
    if case == "summary lists ../x":
        summary["outputs"]["../x"] = {"sha256": "0"}
        data = json.dumps(summary).encode()
    if case == "embeddings.npy holds objects":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        data = buf.getvalue()
    (out / name).write_bytes(data)
    if name != "summary.json":  # the forger also fixes summary.json's hash

        summary = json.loads((out / "summary.json").read_text())
        summary["outputs"][name]["sha256"] = hashlib.sha256(data).hexdigest()
        (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match=needle):
        read_outputs(out)


def test_rows_begun_from_a_tar_that_was_replaced_are_embedded_again(tmp_path):
    state = sh.ShardState(tmp_path / "s.sqlite")
    assert not state.check_stamp(0, "size=10240")
    state.add(0, [(0, "00000.tar/a", np.ones(4, np.float32), None)])
    assert not state.check_stamp(0, "size=10240") and state.count(0) == 1  # the same tar: rows kept
    assert state.check_stamp(0, "size=20480") and state.count(0) == 0  # another tar: rows dropped
    state.close()


def test_a_non_finite_vector_becomes_a_skipped_line_not_a_corrupt_part(pngs, tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(map(str, pngs[:3])) + "\n")
    src = open_source(lst)
    model = {"id": "sha256:m", "name": "m", "embed_dim": 4}
    with sh.ShardRun(src, tmp_path / "out", model, part_size=10_000) as run:
        [(part, n_items, todo)] = list(run.pending())
        v = np.ones(4, np.float32)
        run.add(part.id, [(0, todo[0].key, v, None), (1, todo[1].key, v * np.inf, None), (2, todo[2].key, v, None)])
        run.finish_part(part, n_items)
    plan = sh.read_manifest(tmp_path / "out")["plan_id"]
    assert sh.part_status(tmp_path / "out", 0, plan) == ("complete", None)
    [(n, acc, skipped)] = _accounted(tmp_path / "out", 1)
    assert n == 2 and skipped == [[todo[1].key, sh.NON_FINITE]]


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "a/../../x.png", "", "a\0b.png"])
def test_a_path_out_of_the_collection_is_refused(tmp_path, rel):
    with pytest.raises(InputError, match="not inside the collection"):
        collection_file(tmp_path, rel)
    assert collection_file(tmp_path, "a/..b/'=c.png") == tmp_path / "a" / "..b" / "'=c.png"


def test_a_part_replaced_by_another_self_consistent_file_is_caught_by_the_resume_record(shard_dir, tiny_model,
                                                                                         tmp_path):
    """The footer's digest travels with the file; the one kept in _state when the part was written
    does not: a part rewritten with other vectors and a recomputed digest is still refused."""
    lst, _, vectors = shard_dir
    out = _copy(shard_dir, tmp_path)
    plan = sh.read_manifest(out)["plan_id"]
    path = out / sh.part_name(1)
    t = pq.read_table(path)
    idx, keys = t.column("idx").to_numpy(), t.column("key").to_pylist()
    forged = vectors[10:][::-1].copy()  # the same vectors, in another order: finite, plausible
    meta = dict(t.schema.metadata)
    meta[sh.DIGEST_KEY] = sh.part_digest(idx, keys, forged).encode()
    pq.write_table(sh.part_table(idx, keys, forged).replace_schema_metadata(meta), path)
    assert sh.part_status(out, 1, plan)[0] == "complete"  # the file alone is self-consistent
    with pytest.raises(InputError, match="recorded in _state"):
        sh.open_shards(out)
    stats = embed_shards(lst, out, tiny_model, part_size=10, progress=False)
    assert stats.parts_written == 1
    np.testing.assert_array_equal(sh.open_shards(out).load_all(), vectors)
