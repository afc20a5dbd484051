"""libml_runtime: executes compiled libml plans. Imports neither ``onnx`` nor ``libml_compile``."""
