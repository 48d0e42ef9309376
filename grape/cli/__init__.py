"""The `grape` command: the parser (`main`), the problem's flags and plugins (`problem`) and one
module per verb (`commands/`). Commands parse, call a stage function and print; the library never
imports this package.
"""
