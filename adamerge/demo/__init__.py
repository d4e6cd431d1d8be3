"""Real demo assets (base model, fine-tuned experts, calibration and evaluation data), built once and cached."""

from adamerge.demo.vision import DEFAULT_TASKS, DemoAssets, DemoSettings, build_vision_demo

__all__ = ["DEFAULT_TASKS", "DemoAssets", "DemoSettings", "build_vision_demo"]
