"""LLaMA-Excitor: extra keys reconstructed from each token and learnable prompts.

See :mod:`.model` for the method (and the equations we implement) and :mod:`.config`.
"""
