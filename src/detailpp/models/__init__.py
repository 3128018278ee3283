"""Models: loading a pipeline from a name (Hub id, folder, single file, built-in model), model families, Hub files,
LoRA, the tiny and full-size random-weight builders, and the files bundled with the package."""
