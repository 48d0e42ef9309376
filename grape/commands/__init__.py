"""One module per `grape` verb; see grape/cli.py for the contract."""
