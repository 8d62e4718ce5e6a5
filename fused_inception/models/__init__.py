"""Whole networks built from fused blocks."""

from fused_inception.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from fused_inception.models.inception_v3 import Inception3, InceptionOutputs, inception_v3

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "Inception3", "InceptionOutputs", "googlenet", "inception_v3"]
