"""Settings, read from ``KIAPI_*`` environment variables (and an optional ``.env``).

Settings are created by the CLI (or a test) and injected into :func:`kiapi.app.create_app`;
nothing reads the environment at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def physical_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):  # platforms without sysconf
        return 8.0


def default_memory_limit_gb() -> float:
    return round(0.8 * physical_memory_gb(), 2)


def default_files_root() -> Path:
    return platformdirs.user_data_path("kiapi") / "files"


def default_models_file() -> Path:
    return platformdirs.user_config_path("kiapi") / "models.toml"


def _split_list(value: Any, separator: str) -> Any:
    """A list setting from the environment: JSON (``[...]``) or ``separator``-separated."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(separator) if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KIAPI_", env_file=".env", extra="ignore")

    files_root: Path = Field(
        default_factory=default_files_root,
        description="Directory of the Files API store (uploads and artifacts).",
    )
    max_upload_mb: PositiveFloat = Field(512, description="Largest accepted upload, in MB.")
    max_body_mb: PositiveFloat = Field(
        16,
        description="Largest request body other than an upload (JSON), in MB; more -> 413. "
        "Parsing a JSON body holds Python's GIL, about 3 ms per MB: the bound keeps other "
        "requests (/health) answered within ~50 ms while the largest body is parsed. Larger "
        "images go through the Files API or a URL.",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="When set, every endpoint but /health and the docs needs "
        "'Authorization: Bearer <token>'; else 401.",
    )
    host: str = Field(
        "127.0.0.1", description="Bind address of `kiapi serve` (its --host overrides it)."
    )
    port: int = Field(8000, ge=0, le=65535, description="Port of `kiapi serve` (--port).")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Without a token: Host names answered besides loopback and the bound host, "
        "comma-separated ('.example.com' for a domain and its subdomains, '*' for any).",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins (scheme://host:port) that may call the API cross-site, "
        "comma-separated; without a token every other cross-site request is a 403.",
    )
    header_timeout_s: PositiveFloat = Field(
        10, description="Seconds a connection may take to send its request headers."
    )
    max_connections: PositiveInt = Field(
        512, description="Concurrent connections `kiapi serve` accepts; more -> 503."
    )
    max_queue: PositiveInt = Field(
        256, description="Jobs that may wait for the worker; more -> 503."
    )
    batch_max_items: PositiveInt = Field(
        32,
        description="Most embedding requests one forward pass may serve together; "
        "1 turns batching off.",
    )
    batch_max_tokens: PositiveInt = Field(
        16384,
        description="Most tokens (estimated from text length) one batched forward pass may hold.",
    )
    batch_fill_wait_ms: float = Field(
        20,
        ge=0,
        description="After a batch of n > 1 requests, how long the worker may wait for n to be "
        "queued again before the next batch (a single client never waits); 0: never wait.",
    )
    interlude_share: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Most of the worker's time that queued requests for resident models (such "
        "as embeddings) may take between the layers of a running decode step, instead of "
        "waiting for the whole step; 0: they wait for the step's end.",
    )
    worker_sched_batch: bool = Field(
        True,
        description="Run the inference worker thread, and the threads it starts (MLX's stream "
        "threads, the kernel's OpenMP threads), under Linux's SCHED_BATCH policy, whose "
        "wake-ups preempt no running thread: an MLX evaluation then queues its operations "
        "without being switched out at each one. The HTTP threads keep the default policy. "
        "No effect on other systems.",
    )
    gil_switch_interval_us: float = Field(
        200,
        ge=10,
        le=100_000,
        description="Python's switch interval for `kiapi serve`, in microseconds (Python's "
        "default: 5000): how long a thread running Python keeps the GIL once another asks for "
        "it. The worker needs the GIL between two kernel calls of a decode step; with Python's "
        "default it waited behind the event loop's request handling, with both decode threads "
        "idle.",
    )
    chat_max_tokens: PositiveInt = Field(
        1024,
        description="Most tokens one chat completion may generate: the default max_tokens, "
        "and a larger max_tokens is a 400.",
    )
    sync_timeout_s: PositiveFloat = Field(
        300, description="How long a sync request waits for its job before answering 504."
    )
    max_finished_jobs: int = Field(
        1000, ge=0, description="Finished jobs kept in memory; the oldest are dropped first."
    )
    memory_limit_gb: PositiveFloat = Field(
        default_factory=default_memory_limit_gb,
        description="Global budget for resident models (default: 80% of physical RAM).",
    )
    default_ttl_s: float = Field(
        1800, description="Idle seconds before a model is unloaded; <= 0 pins models."
    )
    ttl_sweep_s: PositiveFloat = Field(
        30, description="How often the idle worker checks model TTLs, in seconds."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    malloc_arenas: int = Field(
        1,
        ge=0,
        description="glibc malloc arenas for `kiapi serve` (0: glibc's default, 8 per core). "
        "One keeps the resting RSS flat: memory freed after a burst can be handed back.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or one JSON object per line (request lines carry "
        "method, path, status, duration_ms, operation and job_id as fields).",
    )

    # -- models -------------------------------------------------------------------------------
    model_paths: dict[str, Path] = Field(
        default_factory=dict,
        description='Explicit model folders, JSON: {"qwen3-embedding-8b": "/models/q8b"} '
        "(keys: name, alias or repo).",
    )
    models_file: Path = Field(
        default_factory=default_models_file,
        description="The user's model catalog (TOML, one [[models]] table per model; read at "
        "start-up if it exists; `kiapi models add` writes it). Default: "
        "~/.config/kiapi/models.toml.",
    )
    embedding_default_model: str | None = Field(
        None, description="Default embedding model (default: the contract's qwen3-embedding-8b)."
    )
    chat_default_model: str | None = Field(
        None, description="Default chat model (default: smollm2-135m-instruct, bundled)."
    )
    rerank_default_model: str | None = Field(
        None, description="Default rerank model (default: the first in the catalog file)."
    )
    rerank_max_documents: PositiveInt = Field(
        1000, description="Most documents one rerank request may hold; more -> 413."
    )
    rerank_max_chars: PositiveInt = Field(
        100_000, description="Longest query or document of a rerank request, in characters."
    )
    warmup: str | None = Field(
        None,
        description="Models loaded at start-up, comma-separated; 'none' for none "
        "(default: each capability's effective default model that is set up).",
    )
    blas: str = Field(
        "auto",
        description="Linux: BLAS for MLX; 'auto' finds OpenBLAS, 'none' keeps MLX's reference "
        "BLAS, or a library path.",
    )
    matmul_precision: Literal["auto", "float32"] = Field(
        "auto",
        description="Matrix products over many rows (prompt chunks, embedding batches): 'auto' "
        "runs them in bfloat16 (float32 sums) on the AMX tiles of CPUs that have them (Intel "
        "Sapphire Rapids and later), about 3x the float32 BLAS; 'float32' never does. Decoding "
        "is unaffected.",
    )

    # -- inputs -------------------------------------------------------------------------------
    local_input_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders image inputs may be read from by local path, ':'-separated "
        "(default: none, local paths refused).",
    )
    max_image_mb: PositiveFloat = Field(20, description="Largest image input, in MB.")
    max_image_pixels: PositiveInt = Field(
        36_000_000, description="Largest decoded image, in pixels (width x height)."
    )
    image_fetch_timeout_s: PositiveFloat = Field(
        10, description="Time limit for fetching an http(s) image input."
    )
    allow_private_urls: bool = Field(
        False,
        description="Let image URLs reach loopback, private, link-local and other non-public "
        "addresses (refused by default: SSRF).",
    )

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return _split_list(value, ",")

    @field_validator("local_input_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        return _split_list(value, os.pathsep)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def token(self) -> str | None:
        """The bearer token, or None when auth is off (an empty setting turns it off)."""
        secret = self.auth_token.get_secret_value() if self.auth_token else ""
        return secret or None

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    def warmup_names(self) -> list[str] | None:
        """Names to warm up, or None for the default (the effective default model)."""
        if self.warmup is None:
            return None
        names = [n.strip() for n in self.warmup.split(",") if n.strip()]
        return [] if [n.lower() for n in names] in ([], ["none"]) else names
