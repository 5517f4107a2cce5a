"""Process-wide settings of the frontend language (SGLang-compatible)."""

from __future__ import annotations


class GlobalConfig:
    """Mutable process-wide frontend settings."""

    def __init__(self) -> None:
        # 0: silent; 2: print the final text after every run.
        self.verbosity = 0
        # The backend used when a program runs without backend=...
        self.default_backend = None
        # Output detokenization settings (passed to backends that honour them).
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        # Interpreter optimisations (kept for compatibility).
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True


global_config = GlobalConfig()

__all__ = ["GlobalConfig", "global_config"]
