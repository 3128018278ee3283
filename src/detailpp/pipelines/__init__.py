"""The Detail++ pipelines: what every one shares (:mod:`~detailpp.pipelines.base`), its output, and one module per
model family (SDXL, SD 1.x/2.x, SDXL + ControlNet), each a subclass of the diffusers pipeline it extends."""
