"""tarflow: Transformer autoregressive normalizing flows, trained by exact likelihood."""

from tarflow.models import ImageFlow, ImageFlowConfig
from tarflow.sampling.guidance import Guidance

__version__ = "0.1.0"

__all__ = ["Guidance", "ImageFlow", "ImageFlowConfig", "__version__"]
