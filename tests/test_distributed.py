"""The same job on dask.distributed gives bit-identical outputs: models, masks and the COG writer survive
pickling, and the bytes do not depend on the scheduler.

Two ways in: the runner's own LocalCluster (``run.workers``), and an existing cluster (``run.address``) started
here exactly as docker/docker-compose.yml starts it (``dask scheduler`` + two ``dask worker`` processes on
127.0.0.1), without docker.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("reflectance", "confidence", "source", "mask_provenance")
TARGET = "S2B_T33UUU_20170226_SIMTHIN"


def _same_bytes(a: dict, b: dict) -> None:
    for layer in LAYERS:
        pa, pb = Path(a[layer]), Path(b[layer])
        with rasterio.open(pa) as x, rasterio.open(pb) as y:
            assert np.array_equal(x.read(), y.read()), layer
        assert pa.read_bytes() == pb.read_bytes(), f"{layer}: same pixels but different bytes"


@pytest.mark.slow
def test_distributed_localcluster_matches_threads(demo_config, demo_run, tmp_path):
    from cloudfree.pipeline.runner import run

    cfg = demo_config.replace(output={"dir": str(tmp_path)}, search={"targets": [TARGET]},
                              run={"scheduler": "distributed", "workers": 2, "memory_limit": "3GiB"})
    res = run(cfg)
    assert [r.status for r in res] == ["done"], res[0].error
    _same_bytes(res[0].outputs, next(r for r in demo_run if r.target_id == TARGET).outputs)


@pytest.fixture
def dask_cluster(tmp_path):
    """``dask scheduler`` + 2 ``dask worker`` processes (the compose file's entry commands) on 127.0.0.1."""
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GDAL_CACHEMAX": "64"}
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(120):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.25)
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(bindir / "dask"), "worker", "--scheduler-file", str(sched_file), "--nworkers", "1",
                 "--nthreads", "1", "--memory-limit", "2GiB", "--name", f"w{i}"],
                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import json

        from distributed import Client

        address = json.loads(sched_file.read_text())["address"]
        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_existing_cluster_via_run_address_matches_threads(demo_config, demo_run, dask_cluster, tmp_path, capfd):
    """run.address: the job goes to an already running scheduler with 2 workers; same bytes as threads; the
    dashboard link is printed; each worker builds the model once (the per-worker model cache)."""
    from distributed import Client

    from cloudfree.pipeline.runner import run

    cfg = demo_config.replace(output={"dir": str(tmp_path)}, search={"targets": [TARGET]},
                              run={"scheduler": "distributed", "address": dask_cluster})
    res = run(cfg)
    assert [r.status for r in res] == ["done"], res[0].error
    err = capfd.readouterr().err
    assert "dashboard: http://127.0.0.1:" in err, err[-2000:]
    _same_bytes(res[0].outputs, next(r for r in demo_run if r.target_id == TARGET).outputs)
    with Client(dask_cluster) as c:
        built = c.run(lambda: sorted(k[0] for k in __import__("cloudfree.stages.remove", fromlist=["_MODELS"])._MODELS))
    assert len(built) == 2
    for models in built.values():  # built at most once per worker process (tiles ran on one or both)
        assert models in ([], [cfg.model.name])
    assert any(built.values())


def test_compose_file_starts_a_scheduler_two_workers_and_the_job(monkeypatch):
    """docker/docker-compose.yml (no docker engine here): valid YAML with the services, commands and settings the
    distributed run needs; the entry commands themselves run in test_existing_cluster_via_run_address..."""
    spec = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    svc = spec["services"]
    assert set(svc) == {"scheduler", "worker", "cloudfree"}
    assert svc["scheduler"]["entrypoint"] == ["dask", "scheduler"]
    assert "8786" in svc["scheduler"]["command"] and ":8787" in svc["scheduler"]["command"]
    assert svc["worker"]["entrypoint"] == ["dask", "worker"]
    assert svc["worker"]["command"][0] == "tcp://scheduler:8786" and svc["worker"]["deploy"]["replicas"] == 2
    env = svc["cloudfree"]["environment"]
    assert env["CLOUDFREE_RUN__SCHEDULER"] == "distributed" and env["CLOUDFREE_RUN__ADDRESS"] == "tcp://scheduler:8786"
    for name, s in svc.items():
        assert s["image"] == "cloudfree:latest" and s["build"]["dockerfile"] == "docker/Dockerfile", name
        assert "outputs:/app/outputs" in s["volumes"], name  # workers write the COG parts: one shared (named) volume
        assert "data:/app/data" in s["volumes"], name
    assert (ROOT / svc["cloudfree"]["build"]["dockerfile"]).exists()
    # the job's env overrides parse into a valid config
    from cloudfree.pipeline.config import load_config

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.run.scheduler == "distributed" and cfg.run.address == "tcp://scheduler:8786"
    assert cfg.run.concurrent_targets == 2


def test_map_units_runs_units_side_by_side_and_keeps_their_order():
    """run.concurrent_targets: up to n units in flight (a barrier that needs both would time out if they ran one
    after the other), results in input order, and a local scheduler falls back to one at a time."""
    import threading

    from cloudfree.pipeline.config import parse_config
    from cloudfree.pipeline.runner import concurrent_units, map_units

    barrier = threading.Barrier(2, timeout=20)

    def unit(i):
        barrier.wait()
        time.sleep(0.05 * (2 - i))  # the first finishes last
        return i * 10

    assert map_units(unit, [1, 2], 2) == [10, 20]
    assert map_units(lambda i: i + 1, [1, 2, 3], 1) == [2, 3, 4]
    cfg = parse_config({"run": {"scheduler": "threads", "concurrent_targets": 3}}, source="test")
    assert concurrent_units(cfg) == 3
    cfg = parse_config({"run": {"scheduler": "synchronous", "concurrent_targets": 3}}, source="test")
    assert concurrent_units(cfg) == 1
    cfg = parse_config({"run": {"scheduler": "distributed", "concurrent_targets": 3}}, source="test")
    assert concurrent_units(cfg) == 3


@pytest.mark.slow
def test_concurrent_targets_on_a_localcluster_match_threads(demo_config, demo_run, tmp_path):
    """Both demo targets submitted to one LocalCluster at the same time give the bytes of the threaded run."""
    from cloudfree.pipeline.runner import run

    cfg = demo_config.replace(output={"dir": str(tmp_path)},
                              run={"scheduler": "distributed", "workers": 2, "memory_limit": "3GiB",
                                   "concurrent_targets": 2})
    res = run(cfg)
    assert len(res) == len(demo_run) >= 2 and all(r.status == "done" for r in res), [r.error for r in res]
    assert [r.target_id for r in res] == [r.target_id for r in demo_run]
    for r in res:
        _same_bytes(r.outputs, next(d for d in demo_run if d.target_id == r.target_id).outputs)


def test_concurrent_targets_on_threads_match_one_at_a_time(demo_config, demo_run, tmp_path):
    """Both demo targets in flight on the local threaded scheduler give the bytes of the one-at-a-time run."""
    from cloudfree.pipeline.runner import run

    cfg = demo_config.replace(output={"dir": str(tmp_path)}, run={"scheduler": "threads", "concurrent_targets": 2})
    res = run(cfg)
    assert len(res) == len(demo_run) >= 2 and all(r.status == "done" for r in res), [r.error for r in res]
    assert [r.target_id for r in res] == [r.target_id for r in demo_run]
    for r in res:
        _same_bytes(r.outputs, next(d for d in demo_run if d.target_id == r.target_id).outputs)
