"""The method of the paper, on tensors: shared self-attention and cross-attention capture (section 3.2, eq. 3), subject
masks (eq. 3), Accumulative Latent Modification (eq. 4), attention nursing (eqs. 6-9), the engine that runs one
denoising step as Algorithm 1 does, and compilation. Nothing here knows a pipeline class or a text encoder."""
