"""acctrain: a distributed PyTorch trainer on HuggingFace Accelerate with exact global-batch semantics."""

from acctrain.callbacks import Callback
from acctrain.config import TrainConfig, load_config
from acctrain.engine import Engine
from acctrain.errors import ConfigError
from acctrain.version import __version__

__all__ = ["Callback", "ConfigError", "Engine", "TrainConfig", "__version__", "load_config"]
