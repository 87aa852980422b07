from .callback import LocaCallback
from .config import LocaConfig
from .layer import LocaLinear
from .model import LocaModel
from .schedule import LocaSchedule, loca_param_groups

__all__ = ["LocaCallback", "LocaConfig", "LocaLinear", "LocaModel", "LocaSchedule", "loca_param_groups"]
