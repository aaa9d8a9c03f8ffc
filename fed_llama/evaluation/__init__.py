"""Task evaluation: generate answers for held-out questions and score them."""
