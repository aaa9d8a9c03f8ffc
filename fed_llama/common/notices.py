"""Third-party notices that tell a fed-llama user nothing, silenced where they are raised.

Each filter names one library, one logger or warning category, and the start of one message:
nothing else from that library is hidden, and nothing is filtered process-wide by category.
This module imports no heavy library at import time. peft is imported through
:func:`fed_llama.adapter.peft_import.peft_module`, which calls :func:`quiet_bitsandbytes` first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator

BNB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
"""bitsandbytes' CPU backend logs, at import, that an optional kernel package is missing."""
BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"
"""That message's start: bitsandbytes falls back to its own CPU path, which is the one used
here (QLoRA on CPU), and a LoRA run never calls it at all."""
TORCH_SCRIPT_METHOD_NOTICE = r".*torch\.jit\.script_method"
"""torch's DeprecationWarning "``torch.jit.script_method`` is deprecated", raised about torch's
own ``torch.utils.mkldnn`` when bitsandbytes' ``torch.compile`` decorators first load torch's
compiler at import (torch 2.13)."""


ORT_QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"
"""onnxruntime's MatMulNBits quantizer logs two INFO lines for every node of the graph it walks
("skip to quantize", "start to quantize": thousands for a real model), which say nothing a
fed-llama user can act on; its warnings still show."""


FLOWER_ACTOR_NOTICE = "Manually terminating"
"""Flower's simulation logs this at WARNING in each Ray worker when it stops the worker's
ClientApp actor at the end of a run: the routine end of every simulation, not a problem."""


class DropMessage(logging.Filter):
    """A logger filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop_log_message(logger_name: str, prefix: str) -> None:
    """Add a :class:`DropMessage` filter for ``prefix`` to the logger, once."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(DropMessage(prefix))


def quiet_flower_actor() -> None:
    """Drop Flower's actor-shutdown notice (:data:`FLOWER_ACTOR_NOTICE`) in this process: call
    it where a ClientApp runs (a simulation worker), before the run ends."""
    drop_log_message("flwr", FLOWER_ACTOR_NOTICE)


def quiet_bitsandbytes() -> None:
    """Import bitsandbytes now, if it is installed, without its two import-time notices: its
    missing-kernel log line (:data:`BNB_KERNEL_NOTICE`, dropped from its logger for the rest of
    the process) and torch's ``script_method`` warning (:data:`TORCH_SCRIPT_METHOD_NOTICE`,
    ignored during this import only). peft imports bitsandbytes on its own (0.21 when peft is
    imported, 0.22 when it first wraps a layer, even for plain LoRA), as does transformers for
    NF4 weights; importing it here first, before either, keeps the notices out whichever
    version is installed. Flower's simulation puts a "once" filter for all DeprecationWarnings
    in front of any set at start-up, so the warning is silenced here, where it is raised.
    Safe to call more than once."""
    drop_log_message(BNB_KERNEL_LOGGER, BNB_KERNEL_NOTICE)
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    with without_script_method_notice():
        import bitsandbytes  # noqa: F401


@contextlib.contextmanager
def without_script_method_notice() -> Iterator[None]:
    """Inside: torch's ``script_method`` DeprecationWarning (:data:`TORCH_SCRIPT_METHOD_NOTICE`,
    raised while bitsandbytes is imported) is not shown; every other warning is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCH_SCRIPT_METHOD_NOTICE,
                                category=DeprecationWarning)
        yield


@contextlib.contextmanager
def below_info(logger_name: str) -> Iterator[None]:
    """Inside: the logger ``logger_name`` shows warnings and errors only; its level is restored
    on the way out."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def without_checkpointing_notice() -> Iterator[None]:
    """Inside: transformers' FutureWarning "``is_gradient_checkpointing`` is deprecated"
    (raised when peft's model wrapper reads that property) is not shown; every other warning
    is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield
