"""libml_runtime: executes compiled libml plans. Imports neither ``onnx`` nor ``libml_compile``.

``load(path)`` reads a plan file written by ``Program.save`` / ``Executable.save`` (format: FORMAT.md)
and returns an ``Executable`` with ``run``/``grad``/``step``/``params``; every field is validated first
and any violation raises ``PlanError``.
"""
from .plan import Entry, Plan, PlanError, validate
from .executable import Executable, NonFiniteError, RuntimeFailure
from .planfile import FORMAT_VERSION, load, load_plan
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["load", "load_plan", "PlanError", "Executable", "Plan", "Entry", "validate", "NonFiniteError",
           "RuntimeFailure", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "CheckpointError"]
