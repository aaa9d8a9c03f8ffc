"""peft, imported once and quietly."""

from __future__ import annotations

from types import ModuleType

from fed_llama.common.notices import quiet_bitsandbytes


def peft_module() -> ModuleType:
    """peft, imported after bitsandbytes has been imported quietly
    (:func:`~fed_llama.common.notices.quiet_bitsandbytes`): peft imports bitsandbytes whenever
    it is installed, even for plain LoRA, in every process (each simulation worker included),
    at import (peft 0.21) or when it first wraps a layer (peft 0.22), and that import logs a
    missing-kernel notice and makes torch warn about its own code."""
    quiet_bitsandbytes()
    import peft

    return peft
