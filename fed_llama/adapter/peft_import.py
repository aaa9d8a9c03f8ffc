"""peft, imported once and quietly, and kept from importing bitsandbytes where no layer needs it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType

from fed_llama.common.notices import (
    BNB_KERNEL_LOGGER,
    BNB_KERNEL_NOTICE,
    drop_log_message,
    quiet_bitsandbytes,
    without_script_method_notice,
)

BNB = "bitsandbytes"


def peft_module(bitsandbytes: bool = True) -> ModuleType:
    """peft, imported after bitsandbytes has been imported quietly
    (:func:`~fed_llama.common.notices.quiet_bitsandbytes`): peft imports bitsandbytes whenever
    it is installed, even for plain LoRA, in every process (each simulation worker included),
    at import (peft 0.21) or when it first wraps a layer (peft 0.22), and that import logs a
    missing-kernel notice and makes torch warn about its own code.

    ``bitsandbytes=False``: not imported now (its log line is still dropped, should it come):
    for callers that wrap layers inside :func:`bitsandbytes_unless_loaded`."""
    if bitsandbytes:
        quiet_bitsandbytes()
    else:
        drop_log_message(BNB_KERNEL_LOGGER, BNB_KERNEL_NOTICE)
    with without_script_method_notice():  # peft <= 0.21 imports bitsandbytes here
        import peft

    return peft


@contextlib.contextmanager
def bitsandbytes_unless_loaded() -> Iterator[None]:
    """Inside: peft wraps layers without importing bitsandbytes, unless this process has
    imported it already (an NF4 backbone's loading does, before any wrap).

    peft 0.22 imports bitsandbytes the first time it wraps a layer whenever the package is
    installed, for its 8-bit and 4-bit dispatchers, which match bitsandbytes' own layers only.
    A backbone loaded without it has none of those, so the import changes nothing there but
    costs 1.3 s, in every process Flower starts for a message. Hidden as Python's import system
    marks a module it must not import (``sys.modules[name] = None``: ``find_spec`` answers
    None, ``import`` raises ImportError), with peft's and transformers' remembered answers
    cleared on the way in and out, so that a later NF4 backbone in the same process sees
    bitsandbytes again."""
    if BNB in sys.modules:
        yield
        return
    from peft import import_utils

    remembered = [import_utils.is_bnb_available, import_utils.is_bnb_4bit_available]
    with contextlib.suppress(ImportError, AttributeError):  # transformers remembers it too
        from transformers.utils import import_utils as transformers_imports

        remembered.append(transformers_imports.is_bitsandbytes_available)
    sys.modules[BNB] = None  # type: ignore[assignment]
    for answer in remembered:
        answer.cache_clear()
    try:
        yield
    finally:
        if sys.modules.get(BNB, ...) is None:
            del sys.modules[BNB]
        for answer in remembered:
            answer.cache_clear()
