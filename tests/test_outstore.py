"""Object-store outputs (issue 17): ``cloudfree run --out s3://bucket/prefix`` against a real S3-compatible server on
127.0.0.1 (moto in server mode, started here: a real HTTP S3 API, not a mock of cloudfree's code), read back through
GDAL's ``/vsis3/``; a run killed with SIGKILL after its first object appears resumes to objects byte-identical to an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test extra (pip install -e .[test])")
boto3 = pytest.importorskip("boto3")

BUCKET = "bucket"
KEYS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1"}
#: item properties that differ between any two runs (run id, processing time, per-tile timings)
VOLATILE = ("cloudfree:run_id", "processing:datetime", "cloudfree:tile_seconds")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (free port) with one bucket; yields (endpoint, boto3 client)."""
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"], region_name=KEYS["AWS_REGION"])
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    srv.stop()


def _env(endpoint: str, cache: Path, catalog: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **KEYS, "AWS_ENDPOINT_URL": endpoint,
            "XDG_CACHE_HOME": str(cache), "CLOUDFREE_CATALOG__URL": str(catalog)}


def _run(args: list[str], env: dict, **kw):
    return subprocess.Popen([sys.executable, "-m", "cloudfree.pipeline.cli", *args], env=env, cwd=ROOT, **kw)


def _objects(client, prefix: str) -> dict[str, bytes]:
    out, token = {}, None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix + "/"} | ({"ContinuationToken": token} if token else {})
        page = client.list_objects_v2(**kw)
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def _stable(key: str, body: bytes):
    """An object's content as compared between runs: bytes, except the run-specific item properties."""
    if key.endswith(".json"):
        d = json.loads(body)
        for k in VOLATILE:
            d.get("properties", {}).pop(k, None)
        return d
    return body


@pytest.fixture(scope="module")
def clean_run(s3, demo_catalog, tmp_path_factory):
    """An uninterrupted run of the demo job to s3://bucket/clean/run."""
    endpoint, client = s3
    tmp = tmp_path_factory.mktemp("outstore")
    p = _run(["run", "-c", str(ROOT / "configs" / "demo.yaml"), "--no-progress", "--out", f"s3://{BUCKET}/clean/run"],
             _env(endpoint, tmp / "cache-clean", demo_catalog), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
             text=True)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out + err[-3000:]
    return tmp, out, _objects(client, "clean/run")


def test_run_to_s3_writes_valid_cogs_item_and_collection_readable_through_vsis3(s3, clean_run, monkeypatch):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    endpoint, _ = s3
    _, stdout, objs = clean_run
    assert f"outputs in s3://{BUCKET}/clean/run" in stdout
    items = [k for k in objs if k.count("/") == 1 and k.split("/")[1] == k.split("/")[0] + ".json"]
    assert len(items) == stdout.count("\ndone ") + stdout.startswith("done ") >= 1, stdout
    assert "collection.json" in objs and "catalog.json" in objs
    coll = json.loads(objs["collection.json"])
    assert sorted(lk["href"] for lk in coll["links"] if lk["rel"] == "item") == sorted(f"./{k}" for k in items)
    assert not [k for k in objs if k.startswith((".staging/", ".locks/"))]  # published, locks released
    assert any(k.startswith("reports/") and k.endswith("report.md") for k in objs)
    gdal = {"AWS_S3_ENDPOINT": endpoint.removeprefix("http://"), "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
            "AWS_ACCESS_KEY_ID": KEYS["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": KEYS["AWS_SECRET_ACCESS_KEY"],
            "AWS_REGION": KEYS["AWS_REGION"], "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    for k, v in gdal.items():  # GDAL's own configuration, from the environment (rasterio.Env refuses AWS_* options)
        monkeypatch.setenv(k, v)
    for key in items:
        item = json.loads(objs[key])
        assert item["properties"].get("cloudfree:status", "done") == "done"
        stem = key.split("/")[0]
        for name in ("reflectance", "confidence", "source"):
            href = item["assets"][name]["href"]
            assert href == f"./{stem}_{name}.tif"
            vsi = f"/vsis3/{BUCKET}/clean/run/{stem}/{stem}_{name}.tif"
            with rasterio.Env():
                valid, errors, _ = cog_validate(vsi, quiet=True)
                assert valid, (vsi, errors)
                with rasterio.open(vsi) as src:
                    assert src.crs is not None and src.count >= 1
                    if name == "reflectance":
                        assert src.count == len(item["assets"]["reflectance"]["eo:bands"])
                        a = src.read(1, window=((0, 64), (0, 64)))
                        assert a.any()  # real reflectance, not an empty file


def test_sigkill_after_first_object_then_rerun_gives_byte_identical_objects(s3, clean_run, demo_catalog):
    endpoint, client = s3
    tmp, _, clean = clean_run
    env = _env(endpoint, tmp / "cache-killed", demo_catalog)
    args = ["run", "-c", str(ROOT / "configs" / "demo.yaml"), "--no-progress", "--out", f"s3://{BUCKET}/killed/run"]
    p = _run(["-q", *args], env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="killed/run/").get("Contents", [])]
        published = [k for k in keys if not k.startswith(("killed/run/.locks/", "killed/run/.staging/"))]
        if published:
            first = published[0]
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait(timeout=60)
    assert first is not None and p.returncode == -signal.SIGKILL, "the run ended before its first object appeared"
    partial = _objects(client, "killed/run")
    # killed mid-publish: not every object of the clean run is there (the later items certainly not)
    assert set(partial) != set(k for k in clean if not k.startswith("reports/"))
    r = _run(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, out + err[-3000:]
    resumed = _objects(client, "killed/run")
    a = {k: v for k, v in clean.items() if not k.startswith("reports/")}
    b = {k: v for k, v in resumed.items() if not k.startswith("reports/")}
    assert sorted(a) == sorted(b)  # no staging key, no lock left; nothing missing
    for k in a:
        if k.endswith(".json"):
            assert _stable(k, a[k]) == _stable(k, b[k]), k
        else:
            assert a[k] == b[k], f"{k} differs after kill + resume"
    # a third run skips every target: they are done in the store
    r = _run(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0 and out.splitlines()[0].startswith("skipped") and " done" not in out, out


def test_store_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(s3):
    from cloudfree.pipeline.outstore import OutputStore

    endpoint, client = s3
    st = OutputStore(f"s3://{BUCKET}/locks", {"endpoint": endpoint, "access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
                                              "secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"], "region": "us-east-1"})
    import obstore
    from obstore.exceptions import AlreadyExistsError

    with st.lock("t"):
        with pytest.raises(AlreadyExistsError):  # the conditional create refuses a second holder
            obstore.put(st.store, ".locks/t.lock", b"x", mode="create")
    assert not st.exists(".locks/t.lock")  # released
    # a lock left by a process that is gone (same host): stale, taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    obstore.put(st.store, ".locks/t.lock", json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                       "time": time.time()}).encode())
    t0 = time.monotonic()
    with st.lock("t"):
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("case", ["no-bucket", "no-endpoint"])
def test_object_store_that_cannot_be_used_is_a_config_error_exit_2(case, s3, demo_catalog, tmp_path):
    endpoint, _ = s3
    if case == "no-endpoint":  # a closed port: nothing listens there
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    url = "s3://no-such-bucket/x" if case == "no-bucket" else f"s3://{BUCKET}/x"
    env = _env(endpoint, tmp_path / "cache", demo_catalog)
    r = subprocess.run([sys.executable, "-m", "cloudfree.pipeline.cli", "run", "-c", str(ROOT / "configs" / "demo.yaml"),
                        "--no-progress", "--out", url], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr[-2000:]
    assert f"output.dir {url}" in r.stderr and "AWS_ENDPOINT_URL" in r.stderr
    assert not list(tmp_path.glob("s3*"))


def test_composite_to_an_object_store_is_refused_with_exit_2(s3, demo_catalog, tmp_path):
    endpoint, _ = s3
    env = _env(endpoint, tmp_path / "cache", demo_catalog)
    region = tmp_path / "region.geojson"
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [[[13, 48], [13.1, 48], [13.1, 48.1], [13, 48]]]}))
    r = subprocess.run([sys.executable, "-m", "cloudfree.pipeline.cli", "composite", "-c",
                        str(ROOT / "configs" / "demo.yaml"), "--region", str(region), "--period", "2017",
                        "--out", f"s3://{BUCKET}/comp"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "composites are written only to a local folder" in r.stderr, r.stderr[-2000:]
