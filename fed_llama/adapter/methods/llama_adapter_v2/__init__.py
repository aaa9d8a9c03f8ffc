"""LLaMA-Adapter V2 (text): bias, scale and norm tuning, with or without gated prompts.

See :mod:`.model` for the method and :mod:`.config` for its settings.
"""
