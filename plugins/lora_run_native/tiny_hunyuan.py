"""Moved to ``lora_run_hunyuan_image.tiny`` and ``lora_run_hunyuan_dit.tiny``; this name is kept for bench/ scripts."""
from lora_run_hunyuan_dit.tiny import PUBLISHED_SCHEDULERS, build_tiny_hunyuan_dit  # noqa: F401
from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image, write_hunyuan_image_single_files  # noqa: F401
