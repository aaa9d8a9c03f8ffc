"""Starting federations: ``fed-llama simulate`` (:mod:`.simulate`) and the apps ``flwr run .``
loads (:mod:`.flwr_run`). The top of the package graph below the CLI: it imports the client
and the server side, and nothing below imports it."""
