"""Every setting of memsync, read from the environment and a `.env` file.

Only the wiring (`actors/`, the CLI) reads this module; `kvstore` and `vectorstore` take explicit
arguments. Times are in milliseconds, as in Dramatiq.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "load_settings"]


class SettingsError(Exception):
    """Raised when a setting is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    """The configuration of one memsync process."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    redis_url: str | None = Field(None, alias="REDIS_URL")
    broker_url: str | None = Field(None, alias="BROKER_URL")
    chroma_url: str | None = Field(None, alias="CHROMA_URL")
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    embedding_model: str = Field("text-embedding-3-large", alias="EMBEDDING_MODEL", min_length=1)
    embedding_dimensions: int | None = Field(None, alias="EMBEDDING_DIMENSIONS", gt=0, le=16384)
    embedder: Literal["auto", "openai", "local"] = Field("auto", alias="MEMSYNC_EMBEDDER")
    embedding_timeout_ms: int = Field(30_000, alias="MEMSYNC_EMBEDDING_TIMEOUT_MS", gt=0)
    embedding_max_tokens: int = Field(8191, alias="EMBEDDING_MAX_TOKENS", ge=16, le=1_000_000)
    data_dir: Path = Field(Path(".memsync"), alias="MEMSYNC_DATA_DIR")
    prefix: str = Field("memsync", alias="MEMSYNC_PREFIX", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    queue: str = Field("memsync", alias="MEMSYNC_QUEUE", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_retries: int = Field(3, alias="MEMSYNC_MAX_RETRIES", ge=0, le=100)
    min_backoff_ms: int = Field(500, alias="MEMSYNC_MIN_BACKOFF_MS", gt=0)
    max_backoff_ms: int = Field(30_000, alias="MEMSYNC_MAX_BACKOFF_MS", gt=0)
    history_length: int = Field(10, alias="MEMSYNC_HISTORY_LENGTH", ge=1, le=10_000)
    max_value_bytes: int = Field(1_048_576, alias="MEMSYNC_MAX_VALUE_BYTES", gt=0, le=512 * 1024 * 1024)
    result_ttl_ms: int = Field(86_400_000, alias="MEMSYNC_RESULT_TTL_MS", gt=0)
    heartbeat_timeout_ms: int = Field(10_000, alias="MEMSYNC_HEARTBEAT_TIMEOUT_MS", ge=1_000)
    maintenance_chance: int = Field(500_000, alias="MEMSYNC_MAINTENANCE_CHANCE", ge=1, le=1_000_000)
    time_limit_ms: int = Field(120_000, alias="MEMSYNC_TIME_LIMIT_MS", gt=0)
    index_shards: int = Field(16, alias="MEMSYNC_INDEX_SHARDS", ge=1, le=4096)
    index_check_ms: int = Field(1_000, alias="MEMSYNC_INDEX_CHECK_MS", ge=10, le=60_000)
    coalesce_ms: int = Field(5, alias="MEMSYNC_COALESCE_MS", ge=0, le=1000)
    coalesce_max: int = Field(256, alias="MEMSYNC_COALESCE_MAX", ge=1, le=2048)
    search_retry_budget_ms: int = Field(2_000, alias="MEMSYNC_SEARCH_RETRY_BUDGET_MS", ge=0, le=60_000)
    log_format: Literal["text", "json"] = Field("text", alias="MEMSYNC_LOG_FORMAT")
    metrics_port: int | None = Field(None, alias="MEMSYNC_METRICS_PORT", gt=0, lt=65536)
    metrics_host: str = Field("0.0.0.0", alias="MEMSYNC_METRICS_HOST", pattern=r"^[A-Za-z0-9.-]{1,253}$")
    local_redis_port: int = Field(6479, alias="MEMSYNC_LOCAL_REDIS_PORT", gt=0, lt=65536)
    local_chroma_port: int = Field(8479, alias="MEMSYNC_LOCAL_CHROMA_PORT", gt=0, lt=65536)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        return _checked_url(url, ("redis", "rediss", "unix"))

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str | None) -> str | None:
        return _checked_url(url, ("amqp", "amqps", "redis", "rediss", "unix"))

    @field_validator("chroma_url", "openai_base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        return _checked_url(url, ("http", "https"))

    def uses_openai(self) -> bool:
        """Whether embeddings come from an OpenAI-compatible server rather than the local model."""
        if self.embedder == "auto":
            return self.openai_api_key is not None and bool(self.openai_api_key.get_secret_value())
        return self.embedder == "openai"

    def is_local(self) -> bool:
        """Whether Redis or Chroma is the embedded local stack (`REDIS_URL` or `CHROMA_URL` unset)."""
        return self.redis_url is None or self.chroma_url is None

    def effective_redis_url(self) -> str:
        """`REDIS_URL`, or the local stack's Redis."""
        return self.redis_url or f"redis://127.0.0.1:{self.local_redis_port}/0"

    def effective_broker_url(self) -> str:
        """`BROKER_URL`, or the store's Redis (`effective_redis_url`)."""
        return self.broker_url or self.effective_redis_url()

    def uses_rabbitmq(self) -> bool:
        """Whether the broker is RabbitMQ (`BROKER_URL` is `amqp://` or `amqps://`)."""
        return urlsplit(self.effective_broker_url()).scheme in ("amqp", "amqps")

    def effective_chroma_url(self) -> str:
        """`CHROMA_URL`, or the local stack's Chroma server."""
        return self.chroma_url or f"http://127.0.0.1:{self.local_chroma_port}"


def load_settings() -> Settings:
    """Read the settings; a bad value raises SettingsError naming its variable (never its value)."""
    try:
        settings = Settings()
    except ValidationError as err:
        raise SettingsError(_describe(err)) from None
    if settings.max_backoff_ms < settings.min_backoff_ms:
        raise SettingsError("MEMSYNC_MAX_BACKOFF_MS: must not be below MEMSYNC_MIN_BACKOFF_MS")
    return settings


def _checked_url(url: str | None, schemes: tuple[str, ...]) -> str | None:
    """`url` if it parses with one of `schemes` and a usable port; the error never repeats the URL."""
    if url is None:
        return None
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if parts.scheme not in schemes or not (parts.hostname or parts.scheme == "unix"):
        raise ValueError(f"must look like {schemes[0]}://host:port")
    return url


def _describe(err: ValidationError) -> str:
    parts = []
    for problem in err.errors(include_input=False, include_url=False):
        variable = ".".join(str(part) for part in problem["loc"]) or "settings"
        parts.append(f"{variable}: {problem['msg']}")
    return "invalid setting: " + "; ".join(parts)
