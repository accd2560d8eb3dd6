"""The service's settings: the environment's forms of each setting."""

from memupdate.service.config import ServiceConfig


def test_vllm_urls_from_the_environment_as_a_comma_list_or_json(monkeypatch):
    monkeypatch.setenv("MEMUPDATE_VLLM_URLS", "http://a:8000,http://b:8000")
    assert ServiceConfig.load().vllm_urls == ["http://a:8000", "http://b:8000"]
    monkeypatch.setenv("MEMUPDATE_VLLM_URLS", '["http://c:8000"]')
    assert ServiceConfig.load().vllm_urls == ["http://c:8000"]
    assert ServiceConfig.load(vllm_urls=["http://d:8000"]).vllm_urls == ["http://d:8000"]
