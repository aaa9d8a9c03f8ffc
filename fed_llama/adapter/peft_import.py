"""peft, imported once and quietly."""

from __future__ import annotations

import warnings
from types import ModuleType

from fed_llama.common.notices import quiet_bitsandbytes


def peft_module() -> ModuleType:
    """peft, imported without two notices it causes in every process (each simulation worker
    included): importing peft imports bitsandbytes (whenever it is installed, even for plain
    LoRA), whose CPU backend logs that an optional kernel package is missing
    (:func:`~fed_llama.common.notices.quiet_bitsandbytes`), and whose ``torch.compile``
    decorators load ``torch.utils.mkldnn``, which warns "``torch.jit.script_method`` is
    deprecated" (torch 2.13 about its own code). Flower's simulation puts a "once" filter for all
    DeprecationWarnings in front of any set at start-up, so that notice is silenced here, where
    it is raised, and nowhere else."""
    quiet_bitsandbytes()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method",
                                category=DeprecationWarning)
        import peft
    return peft
