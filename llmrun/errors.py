"""The user-facing error hierarchy: every problem a person can cause or fix is one of these."""


class LlmrunError(Exception):
    """A problem reported to the user as one line; the CLI exits with `exit_code`."""

    exit_code = 1


class ModelNotFoundError(LlmrunError):
    """The name matches no local path, store entry, alias or cached repo."""


class ModelUnavailableError(LlmrunError):
    """The model is known but not present locally and cannot be fetched now."""


class ModelNotDownloadedError(ModelUnavailableError):
    """The model is known and absent, and the Hub may be reachable: a command that downloads pulls it."""


class InvalidModelError(LlmrunError):
    """A local folder or file is not a usable model (missing files, corrupt weights)."""


class UnsupportedArchitectureError(LlmrunError):
    """The checkpoint's architecture has no native implementation."""


class DownloadError(LlmrunError):
    """Fetching a model failed."""


class UsageError(LlmrunError):
    """Bad command-line input (sizes, options, empty prompts)."""


class ContextOverflowError(LlmrunError):
    """A prompt or generation does not fit in the context window or KV cache."""


class StorageError(LlmrunError):
    """llmrun's own folders cannot be written (not a folder, no permission, read-only, disk full)."""


class StoreConflictError(LlmrunError):
    """An import would replace a different model of the same name in llmrun's store."""


class QueueFullError(LlmrunError):
    """The engine loop's waiting queue is full (the server answers 429): try again later."""


class EngineStoppedError(LlmrunError):
    """The engine loop is shutting down, or a step failed, so the request cannot be served."""


class ServerError(LlmrunError):
    """`llmrun serve` cannot start (its address is taken), or a server `run --url` talks to fails."""
