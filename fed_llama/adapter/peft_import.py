"""peft, imported once and quietly."""

from __future__ import annotations

import warnings
from types import ModuleType


def peft_module() -> ModuleType:
    """peft, imported without the notice torch 2.13 gives about its own code: importing peft
    imports bitsandbytes, whose ``torch.compile`` decorators load ``torch.utils.mkldnn``, which
    warns "``torch.jit.script_method`` is deprecated" in every process (each simulation worker).
    Flower's simulation puts a "once" filter for all DeprecationWarnings in front of any set at
    start-up, so the notice is silenced here, where it is raised, and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method",
                                category=DeprecationWarning)
        import peft
    return peft
