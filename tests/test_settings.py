"""Settings: defaults, the environment, and start-up errors that name the variable."""

from __future__ import annotations

import pytest

from actors.runtime import make_embedder
from settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "EMBEDDING_MODEL",
        "EMBEDDING_DIMENSIONS",
        "MEMSYNC_MAX_RETRIES",
        "MEMSYNC_MIN_BACKOFF_MS",
        "MEMSYNC_MAX_BACKOFF_MS",
        "OPENAI_API_KEY",
        "REDIS_URL",
        "BROKER_URL",
        "CHROMA_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir("/")  # no .env file


def test_the_defaults_match_the_seed_worker() -> None:
    settings = load_settings()
    assert settings.embedding_model == "text-embedding-3-large"
    assert (settings.max_retries, settings.min_backoff_ms) == (3, 500)
    assert settings.embedding_dimensions is None


def test_without_an_api_key_the_local_model_is_used() -> None:
    settings = load_settings()
    assert not settings.uses_openai()
    assert make_embedder(settings).model == "all-MiniLM-L6-v2"
    assert settings.effective_redis_url() == "redis://127.0.0.1:6479/0"


def test_with_an_api_key_openai_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc")
    monkeypatch.setenv("EMBEDDING_DIMENSIONS", "256")
    settings = load_settings()
    assert settings.uses_openai() and settings.embedding_dimensions == 256


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MEMSYNC_MAX_RETRIES", "many"),
        ("EMBEDDING_DIMENSIONS", "-3"),
        ("MEMSYNC_MIN_BACKOFF_MS", "0"),
        ("MEMSYNC_EMBEDDER", "gpu"),
        ("MEMSYNC_PREFIX", "a b"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_a_backoff_cap_below_its_floor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSYNC_MIN_BACKOFF_MS", "1000")
    monkeypatch.setenv("MEMSYNC_MAX_BACKOFF_MS", "10")
    with pytest.raises(SettingsError, match="MEMSYNC_MAX_BACKOFF_MS"):
        load_settings()


def test_the_api_key_never_appears_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-sentinel-99")
    settings = load_settings()
    assert "sk-secret-sentinel-99" not in repr(settings) and "sk-secret-sentinel-99" not in str(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "redis://:hunter2@127.0.0.1:notaport/0"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("BROKER_URL", "amqp://guest:hunter2@127.0.0.1:notaport/%2F"),
        ("BROKER_URL", "http://guest:hunter2@127.0.0.1:5672"),
        ("CHROMA_URL", "127.0.0.1:8000"),
        ("OPENAI_BASE_URL", "ftp://example"),
    ],
)
def test_a_malformed_url_is_refused_naming_the_variable_but_not_the_url(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable) as caught:
        load_settings()
    assert value not in str(caught.value) and "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("broker_url", "rabbitmq", "effective"),
    [
        (None, False, "redis://store:6379/0"),
        ("amqp://guest:guest@rabbit:5672/%2F", True, "amqp://guest:guest@rabbit:5672/%2F"),
        ("amqps://user:pw@rabbit.example:5671/memsync", True, "amqps://user:pw@rabbit.example:5671/memsync"),
        ("redis://queues:6379/0", False, "redis://queues:6379/0"),
    ],
)
def test_broker_url_chooses_the_broker_and_defaults_to_the_stores_redis(
    monkeypatch: pytest.MonkeyPatch, broker_url: str | None, rabbitmq: bool, effective: str
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://store:6379/0")
    if broker_url is not None:
        monkeypatch.setenv("BROKER_URL", broker_url)
    settings = load_settings()
    assert (settings.uses_rabbitmq(), settings.effective_broker_url()) == (rabbitmq, effective)
