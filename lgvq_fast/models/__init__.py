"""LG-VQ model: VQGAN backbone, text encoders, alignment modules, losses.

transformers is imported only when a text encoder is built.
"""
from lgvq_fast.models.discriminator import NLayerDiscriminator
from lgvq_fast.models.lgvq import LGVQ, PRESETS, LGVQConfig, build_model, preset
from lgvq_fast.models.losses import VQGANLoss
from lgvq_fast.models.perceptual import PerceptualLoss
from lgvq_fast.models.text import TextBatch, TextEncoder, TextFeatures
from lgvq_fast.models.vqgan import Decoder, Encoder

__all__ = ["LGVQ", "LGVQConfig", "PRESETS", "preset", "build_model", "VQGANLoss", "NLayerDiscriminator",
           "PerceptualLoss", "TextBatch", "TextEncoder", "TextFeatures", "Encoder", "Decoder"]
