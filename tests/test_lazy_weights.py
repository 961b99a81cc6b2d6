"""One lazy-weights mechanism for every learned model (issue 23): models/_weights.py LazyWeights. The network is
read on first use, once per process and device, and is never part of the pickled model (dask ships the model)."""

import pickle

import pytest

LEARNED = ("ca-mtcr", "sar-optical-fusion", "cm-cr", "diffusion-enhancement", "temporal-residual")


@pytest.mark.parametrize("name", LEARNED)
def test_every_learned_model_loads_its_weights_through_lazy_weights(name):
    from cloudfree.models._weights import LazyWeights, cache_size, clear_cache
    from cloudfree.models.registry import build_model

    model = build_model(name, {"device": "cpu"})
    assert isinstance(model, LazyWeights)
    assert model.spec.weights == str(model.weights_path) and model.weights_path.is_file()
    clear_cache()
    blob = pickle.dumps(model)
    net = model.network()
    assert cache_size() == 1 and model.network() is net  # loaded once
    assert len(pickle.dumps(model)) == len(blob)  # the model holds no network: nothing more to ship
    assert pickle.loads(blob).network() is net  # a copy in this process shares the loaded network
    clear_cache()


def test_a_missing_weights_file_is_named_with_the_fix(tmp_path):
    from cloudfree.models.registry import build_model
    from cloudfree.pipeline.errors import WeightsError

    for name in ("ca-mtcr", "cm-cr"):
        model = build_model(name, {"weights": str(tmp_path / "absent.safetensors"), "device": "cpu"})
        with pytest.raises(WeightsError, match="absent.safetensors not found; train it"):
            model.network()


def test_there_is_no_second_mechanism():
    import cloudfree.models._generative as gen

    assert not hasattr(gen, "LazyNetworks")
