"""Test-time adaptation: the stream loop (`TestTimeAdaptationModule`) and one object per method (`TTAMethod`)."""

from lightning_modules.tta.base import LabelView, NoAdaptation, TokenView, TTAMethod
from lightning_modules.tta.calibration import BatchCalibration
from lightning_modules.tta.infomax import InfoMax
from lightning_modules.tta.module import TestTimeAdaptationModule
from lightning_modules.tta.pseudo_label import PseudoLabel
from lightning_modules.tta.roid import ROID
from lightning_modules.tta.sar import SAR, sar_adapt_step
from lightning_modules.tta.tent import Tent
from lightning_modules.tta.tlm import TLM

__all__ = ["BatchCalibration", "InfoMax", "LabelView", "NoAdaptation", "PseudoLabel", "ROID", "SAR", "TLM",
           "TTAMethod", "Tent", "TestTimeAdaptationModule", "TokenView", "sar_adapt_step"]
