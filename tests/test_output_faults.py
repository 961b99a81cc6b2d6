"""Output-side faults (issue 19 items 4 and 5, issue 17's URL refusal): disk full, a read-only or blocked output
folder, ``output.dir`` a file, an unreadable ``collection.json``, an ``--overwrite`` interrupted between its two
renames, and a URL-looking ``--out`` that this build cannot honour. Real filesystem conditions throughout: a file
where a folder is expected, ``RLIMIT_FSIZE`` in a subprocess for the full disk (a loop device needs root and
``losetup``), ``chmod`` for a read-only folder when the tests do not run as root (root ignores the mode bits)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_faults import CLOUDY, _catalog, _cfg, _cli, _cogs, _files, _small_aoi, _yaml  # noqa: F401


@pytest.fixture(scope="module")
def small(demo_config, demo_item_dicts, tmp_path_factory):
    """A catalog copy, a config on a small AOI of the cloudy target, and one finished run of it (in-process)."""
    from cloudfree.pipeline.runner import run

    tmp = tmp_path_factory.mktemp("outfaults")
    cat = _catalog(tmp / "cat", list(demo_item_dicts.values()))
    cfg = _cfg(demo_config, cat, tmp / "done", [CLOUDY], _small_aoi(demo_item_dicts[CLOUDY]))
    cfg = cfg.replace(output={"report": False})
    (r,) = run(cfg)
    assert r.status == "done", r.error
    return tmp, cfg, r


def _copytree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- a URL-looking --out ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["ftp://host/x", "http://host/x", "file:///tmp/x"])
def test_url_out_that_cannot_be_honoured_exits_2_and_writes_no_local_scheme_folder(url, small, tmp_path):
    _, cfg, _ = small
    path = _yaml(cfg, tmp_path / "c.yaml")
    r = _cli(["run", "-c", str(path), "--no-progress", "--out", url], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "output.dir" in r.stderr and url in r.stderr
    assert not (tmp_path / url.split("/")[0]).exists() and not list(tmp_path.glob("*:*"))
    assert not (ROOT / url.split("/")[0]).exists()


# -- output.dir is a file -------------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_is_a_config_error_naming_the_output(small, tmp_path):
    _, cfg, _ = small
    f = tmp_path / "out.txt"
    f.write_text("not a folder")
    path = _yaml(cfg.replace(output={"dir": str(f)}), tmp_path / "c.yaml")
    r = _cli(["run", "-c", str(path), "--no-progress"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"output.dir {f} is a file" in r.stderr and "mid-read" not in r.stderr
    assert f.read_text() == "not a folder"
    # a parent that is a file: the folder cannot be created
    path = _yaml(cfg.replace(output={"dir": str(f / "sub")}), tmp_path / "c2.yaml")
    r = _cli(["run", "-c", str(path), "--no-progress"])
    assert r.returncode == 2 and "is a file" in r.stderr and "mid-read" not in r.stderr, r.stderr[-2000:]


# -- a blocked output folder (a file where .staging should be) ------------------------------------------------------
def test_unwritable_staging_is_an_output_error_not_an_input_one(small, tmp_path):
    _, cfg, _ = small
    out = tmp_path / "out"
    out.mkdir()
    (out / ".staging").write_text("a file where the staging folder goes")
    path = _yaml(cfg.replace(output={"dir": str(out)}), tmp_path / "c.yaml")
    r = _cli(["run", "-c", str(path), "--no-progress"])
    assert r.returncode == 1, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[0]
    assert line.startswith("failed"), r.stdout
    text = r.stdout + r.stderr  # the result line on stdout, the error on stderr and in the run report
    assert f"output {out / '.staging'}" in text and "is a file where a folder is needed" in text, text[-2000:]
    assert "mid-read" not in r.stdout + r.stderr and "fetch them again" not in r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores mode bits: chmod 0555 does not block root's writes "
                    "(the blocked-folder and read-only-archive tests cover the same code paths with files)")
def test_read_only_output_folder_chmod(small, tmp_path):
    _, cfg, _ = small
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        path = _yaml(cfg.replace(output={"dir": str(out)}), tmp_path / "c.yaml")
        r = _cli(["run", "-c", str(path), "--no-progress"])
    finally:
        out.chmod(0o755)
    text = r.stdout + r.stderr
    assert r.returncode == 1 and "read-only or not writable" in text and "mid-read" not in text, text[-2000:]


# -- a read-only archive of finished outputs ------------------------------------------------------------------------
def test_read_only_archive_of_finished_outputs_is_skipped_not_failed(small, tmp_path):
    _, cfg, clean = small
    out = _copytree(Path(cfg.output.dir), tmp_path / "archive")
    # the lock cannot be created: as in a read-only archive (chmod when not root, else a file where .locks goes)
    import shutil

    shutil.rmtree(out / ".locks", ignore_errors=True)
    if os.geteuid() == 0:
        (out / ".locks").write_text("blocked")
    else:
        for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
            d.chmod(0o555)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    try:
        path = _yaml(cfg.replace(output={"dir": str(out)}), tmp_path / "c.yaml")
        r = _cli(["run", "-c", str(path), "--no-progress"])
    finally:
        for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.split()[0] == "skipped", r.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# -- disk full --------------------------------------------------------------------------------------------------------
def _fsize_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_disk_full_names_the_output_and_leaves_no_staging(small, tmp_path):
    _, cfg, clean = small
    out = tmp_path / "full"
    path = _yaml(cfg.replace(output={"dir": str(out)}), tmp_path / "c.yaml")
    biggest = max(p.stat().st_size for p in clean.outputs["item"].parent.glob("*.tif"))
    limit = 16 * 1024  # a COG is larger: the write fails part-way, as on a full disk
    assert biggest > limit
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "cloudfree.pipeline.cli", "run", "-c", str(path), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=e, cwd=ROOT, preexec_fn=_fsize_limit(limit))
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert r.stdout.startswith("failed"), r.stdout
    text = r.stdout + r.stderr
    assert "no space left" in text and f"output.dir {out}" in text, text[-3000:]
    assert "mid-read" not in text and "fetch them again" not in text
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())
    stem = clean.outputs["item"].parent.name
    assert not (out / stem).exists()  # nothing half-published
    # with room again, the rerun finishes it: the same COGs as the clean run
    r = _cli(["run", "-c", str(path), "--no-progress"])
    assert r.returncode == 0 and r.stdout.startswith("done"), r.stdout + r.stderr[-2000:]
    assert _cogs(out / stem) == _cogs(clean.outputs["item"].parent)


# -- an unreadable collection.json ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ['{"type": "Collection", "links": [{"rel": "it', '["a foreign file"]'])
def test_unreadable_collection_json_is_rebuilt_with_a_warning(content, small, tmp_path, caplog):
    from cloudfree.pipeline.runner import run

    _, cfg, clean = small
    out = _copytree(Path(cfg.output.dir), tmp_path / "out")
    (out / "collection.json").write_text(content)
    with caplog.at_level("WARNING"):
        (r,) = run(cfg.replace(output={"dir": str(out)}))
    assert r.status == "skipped", r.error
    assert "unreadable" in caplog.text and "collection.json" in caplog.text
    coll = json.loads((out / "collection.json").read_text())
    stem = clean.outputs["item"].parent.name
    assert [lk["href"] for lk in coll["links"] if lk["rel"] == "item"] == [f"./{stem}/{stem}.json"]


def test_collection_update_reads_each_item_version_once_and_follows_rewrites(small, tmp_path):
    """update_collection keeps what it read of each listed item (issue 22: it re-read every item for every target,
    n^2 reads in a run); the collection it writes equals the one built from every item read afresh, also after an
    item is rewritten in place (new bbox: a new version of the file) and after an item folder is removed."""
    from cloudfree.stages.publish import output_collection, update_collection

    _, cfg, clean = small
    out = _copytree(Path(cfg.output.dir), tmp_path / "out")
    stem = clean.outputs["item"].parent.name
    src = json.loads((out / stem / f"{stem}.json").read_text())

    def put(name: str, dx: float) -> Path:
        d = dict(src, id=name, bbox=[v + dx for v in src["bbox"]])
        (out / name).mkdir(exist_ok=True)
        tmp = out / name / f".{name}.json.tmp"  # replaced by a rename, as every writer of items does
        tmp.write_text(json.dumps(d))
        tmp.replace(out / name / f"{name}.json")
        return out / name / f"{name}.json"

    def fresh() -> dict:
        coll = json.loads((out / "collection.json").read_text())
        hrefs = [lk["href"] for lk in coll["links"] if lk["rel"] == "item"]
        return output_collection(cfg.output.collection, "cloudfree outputs",
                                 [json.loads((out / h).read_text()) for h in hrefs], hrefs)

    for k in range(4):
        update_collection(out, put(f"extra{k}", 0.01 * (k + 1)), cfg.output.collection)
    assert json.loads((out / "collection.json").read_text()) == fresh()
    put("extra1", 3.0)  # rewritten in place by someone else: its new bbox counts when another item is updated
    update_collection(out, out / "extra0" / "extra0.json", cfg.output.collection)
    coll = json.loads((out / "collection.json").read_text())
    assert coll == fresh() and coll["extent"]["spatial"]["bbox"][0][2] == src["bbox"][2] + 3.0
    import shutil

    shutil.rmtree(out / "extra1")
    update_collection(out, put("extra2", 0.5), cfg.output.collection)
    coll = json.loads((out / "collection.json").read_text())
    assert coll == fresh() and "./extra1/extra1.json" not in {lk["href"] for lk in coll["links"]}
    assert len([lk for lk in coll["links"] if lk["rel"] == "item"]) == 4


# -- the --overwrite publish window (item 5) --------------------------------------------------------------------------
def test_overwrite_aside_folder_is_not_stale_staging_and_is_restored_when_the_new_output_never_arrived(small,
                                                                                                      tmp_path):
    from cloudfree.pipeline.runner import run
    from cloudfree.pipeline.safety import REPLACED, SEP, clean_stale_staging, recover_replaced

    _, cfg, clean = small
    out = _copytree(Path(cfg.output.dir), tmp_path / "out")
    stem = clean.outputs["item"].parent.name
    good = {n: (out / stem / n).read_bytes() for n in _files(out / stem)}
    # a run killed between publish_dir's two renames: the old output is aside, the new one never arrived
    aside = out / REPLACED / f"{stem}{SEP}4242"
    aside.parent.mkdir()
    (out / stem).rename(aside)
    # and a stale staging folder of the same target from that killed run
    (out / ".staging" / f"{stem}{SEP}deadbeef").mkdir(parents=True)
    assert clean_stale_staging(out, stem) == [out / ".staging" / f"{stem}{SEP}deadbeef"]  # aside restored, kept
    assert {n: (out / stem / n).read_bytes() for n in _files(out / stem)} == good and not aside.exists()
    # the same through a run: restored, then found done (skipped)
    (out / stem).rename(aside)
    (r,) = run(cfg.replace(output={"dir": str(out)}))
    assert r.status == "skipped", r.error
    assert {n: (out / stem / n).read_bytes() for n in _files(out / stem)} == good
    assert not any((out / REPLACED).iterdir())
    # a leftover aside copy next to a published output (the cleanup after the second rename was cut): removed
    aside.mkdir()
    (aside / "x.tif").write_bytes(b"old")
    assert recover_replaced(out, stem) is None and not aside.exists() and (out / stem).is_dir()
