"""Configuration: pydantic models, YAML loading with key-path errors, environment overrides."""

from dicomrouter.units import TimeWindow, format_duration, parse_duration

from .loader import (
    ConfigError,
    YamlLimitError,
    load_config,
    load_config_text,
    load_yaml,
    parse_config,
)
from .models import (
    DESTINATION_KINDS,
    DESTINATION_MODELS,
    BaseDestinationConfig,
    DestinationConfig,
    DicomDestinationConfig,
    DicomListenerConfig,
    DispatchConfig,
    FolderDestinationConfig,
    GroupDestinationConfig,
    RetentionConfig,
    RetryConfig,
    RouteConfig,
    RouterConfig,
    S3DestinationConfig,
    StorageConfig,
)

__all__ = [
    "DESTINATION_KINDS",
    "DESTINATION_MODELS",
    "BaseDestinationConfig",
    "ConfigError",
    "DestinationConfig",
    "DicomDestinationConfig",
    "FolderDestinationConfig",
    "GroupDestinationConfig",
    "DicomListenerConfig",
    "DispatchConfig",
    "RetentionConfig",
    "RetryConfig",
    "RouteConfig",
    "RouterConfig",
    "S3DestinationConfig",
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
