"""Pieces every part of fed-llama uses (files written atomically, hashes)."""
