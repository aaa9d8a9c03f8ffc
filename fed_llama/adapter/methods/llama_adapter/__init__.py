"""LLaMA-Adapter V1 (zero-init attention), through peft's ``AdaptionPromptConfig``.

See :mod:`.model` for the method and :mod:`.config` for its settings.
"""
