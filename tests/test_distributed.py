"""The same job on dask.distributed (2 worker processes) gives bit-identical outputs: models, masks and the
write lock survive pickling."""

import numpy as np
import pytest
import rasterio


@pytest.mark.slow
def test_distributed_run_matches_threads(demo_config, demo_run, tmp_path):
    from pipeline.runner import run

    target = "S2B_T33UUU_20170226_SIMTHIN"
    cfg = demo_config.replace(output={"dir": str(tmp_path)}, search={"targets": [target]},
                              run={"scheduler": "distributed", "workers": 2, "memory_limit": "3GiB"})
    res = run(cfg)
    assert [r.status for r in res] == ["done"], res[0].error
    threads = next(r for r in demo_run if r.target_id == target)
    with rasterio.open(res[0].outputs["reflectance"]) as a, rasterio.open(threads.outputs["reflectance"]) as b:
        assert np.array_equal(a.read(), b.read())
