"""Adapters on disk: peft's save format plus a manifest (see :mod:`fed_llama.adapter.store`)."""

from fed_llama.adapter.store import MANIFEST, load_adapter, read_manifest, save_adapter

__all__ = ["MANIFEST", "load_adapter", "read_manifest", "save_adapter"]
