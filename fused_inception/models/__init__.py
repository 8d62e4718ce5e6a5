"""Whole networks built from fused blocks."""

from fused_inception.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "googlenet"]
