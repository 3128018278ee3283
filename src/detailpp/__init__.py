"""Detail++ for SDXL."""
