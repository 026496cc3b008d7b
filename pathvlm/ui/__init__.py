"""The Gradio app: open a slide, chat with it, see where answers come from, draft the report.

Importing this package does not import gradio; ``build_demo`` does.
"""

from pathvlm.ui.app import build_demo, example_inputs, launch_demo

__all__ = ["build_demo", "example_inputs", "launch_demo"]
