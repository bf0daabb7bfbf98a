"""Assembled flow models, each with a config dataclass."""

from tarflow.models.image_flow import ImageFlow, ImageFlowConfig

__all__ = ["ImageFlow", "ImageFlowConfig"]
