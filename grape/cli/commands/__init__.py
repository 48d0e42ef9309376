"""One module per `grape` verb; see grape/cli/main.py for the contract."""
