"""Reports: markdown tables and plots of a run or a solver comparison (`tables`, `scoreplots`,
`compare`), and `grape inspect`'s summaries of every file GRAPE writes (`inspect`, `inspect_runs`).
"""
