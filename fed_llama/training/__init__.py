"""Local training of a LoRA/QLoRA adapter on a site's data."""
