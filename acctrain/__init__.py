"""acctrain: a distributed PyTorch trainer on HuggingFace Accelerate with exact global-batch semantics."""

from acctrain.callbacks import Callback
from acctrain.config import TrainConfig, load_config
from acctrain.engine import Engine
from acctrain.errors import ConfigError

__all__ = ["Callback", "ConfigError", "Engine", "TrainConfig", "load_config"]
__version__ = "0.1.0"
