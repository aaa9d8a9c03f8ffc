"""The fed-llama command line."""
