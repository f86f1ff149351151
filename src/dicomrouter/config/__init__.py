"""Configuration: pydantic models, YAML loading with key-path errors, environment overrides."""

from .loader import (
    ConfigError,
    YamlLimitError,
    load_config,
    load_config_text,
    load_yaml,
    parse_config,
)
from .models import (
    DicomDestinationConfig,
    DicomListenerConfig,
    DispatchConfig,
    RetentionConfig,
    RetryConfig,
    RouteConfig,
    RouterConfig,
    StorageConfig,
)
from .units import TimeWindow, format_duration, parse_duration

__all__ = [
    "ConfigError",
    "DicomDestinationConfig",
    "DicomListenerConfig",
    "DispatchConfig",
    "RetentionConfig",
    "RetryConfig",
    "RouteConfig",
    "RouterConfig",
    "StorageConfig",
    "TimeWindow",
    "YamlLimitError",
    "format_duration",
    "load_config",
    "load_config_text",
    "load_yaml",
    "parse_config",
    "parse_duration",
]
