from moe_sys.config.loader import ConfigError, apply_override, deep_merge, dump_config, load_config, validate
from moe_sys.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "validate", "apply_override", "deep_merge", "dump_config"]
