"""The demo pipeline: a small Qwen-Image model trained on captioned shapes, shipped with layerscan."""

from pathlib import Path

DEMO_PIPELINE_DIR = Path(__file__).resolve().parent / "pipeline"
"""The shipped pipeline directory (model_index.json plus one folder per component, BF16 safetensors),
written by ``scripts/train_demo.py``."""

__all__ = ["DEMO_PIPELINE_DIR"]
