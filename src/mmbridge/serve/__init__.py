"""Serving: an OpenAI-compatible HTTP API (`app.create_app`) and a Gradio web UI (`ui.build_ui`).

Importing this package stays cheap; fastapi/gradio are imported by the modules that need them.
"""
