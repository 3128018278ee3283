"""Backbones: the denoiser families Detail++ runs on, each behind :class:`detailpp.method.backbone.Backbone`
(:mod:`~detailpp.backbones.unet`: diffusers' ``UNet2DConditionModel``)."""
