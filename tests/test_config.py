"""The service's settings: the environment's forms of each setting."""

import pytest
from pydantic import ValidationError

from memupdate.service.config import ServiceConfig


def test_vllm_urls_from_the_environment_as_a_comma_list_or_json(monkeypatch):
    monkeypatch.setenv("MEMUPDATE_VLLM_URLS", "http://a:8000,http://b:8000")
    assert ServiceConfig.load().vllm_urls == ["http://a:8000", "http://b:8000"]
    monkeypatch.setenv("MEMUPDATE_VLLM_URLS", '["http://c:8000"]')
    assert ServiceConfig.load().vllm_urls == ["http://c:8000"]
    assert ServiceConfig.load(vllm_urls=["http://d:8000"]).vllm_urls == ["http://d:8000"]


def test_adapter_layers_from_the_environment_and_refused_when_negative(monkeypatch):
    monkeypatch.setenv("MEMUPDATE_ADAPTER_LAYERS", "[25]")
    assert ServiceConfig.load().adapter_layers == [25]
    monkeypatch.setenv("MEMUPDATE_ADAPTER_LAYERS", "[-1]")
    with pytest.raises(ValidationError, match=r"no layer \[-1\] to adapt"):
        ServiceConfig.load()


def test_a_service_adapts_the_layers_it_is_given_and_refuses_ones_the_model_lacks(
    tiny_dir, tmp_path
):
    from memupdate.service.runtime import load_runtime, open_registry

    config = ServiceConfig(data_dir=tmp_path, model=str(tiny_dir), adapter_layers=[1])
    runtime = load_runtime(config, open_registry(config), backend=None)
    assert runtime.family.layers == (1,)
    config = ServiceConfig(data_dir=tmp_path, model=str(tiny_dir))
    # the default family's layer: five sixths of the tiny model's 4 layers
    assert load_runtime(config, open_registry(config), backend=None).family.layers == (3,)
    config = ServiceConfig(data_dir=tmp_path, model=str(tiny_dir), adapter_layers=[9])
    with pytest.raises(
        ValueError, match=r"no layer \[9\] to adapt; this model's layers are 0 to 3"
    ):
        load_runtime(config, open_registry(config), backend=None)


def test_one_adapter_per_update_needs_the_gate_that_routes_among_them():
    with pytest.raises(ValidationError, match="adapter_per_update needs the gate"):
        ServiceConfig(adapter_per_update=True)
    assert ServiceConfig(adapter_per_update=True, gate=True).adapter_per_update
