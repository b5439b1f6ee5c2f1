"""A local OpenRouter-compatible HTTP server: the key-management API, ``/key``, ``/credits`` and
deterministic ``/chat/completions``, with fault injection. Never the real OpenRouter."""

from broker.sandbox.app import Sandbox, run_sandbox
from broker.sandbox.faults import Fault
from broker.sandbox.state import SandboxState

__all__ = ["Fault", "Sandbox", "SandboxState", "run_sandbox"]
