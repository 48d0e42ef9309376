import os
import sys

import grape


def _drop_working_directory() -> None:
    """`python -m grape` puts the working directory first on sys.path (the `grape` console
    script puts its bin folder there instead). Left there, any file in it named like an optional
    import of torch or transformers (cython.py, triton.py) would run inside the verb, so it goes
    before anything else is imported; both entry points then search the same places. Kept only
    when it is grape's own source tree (a checkout run without installing)."""
    if not sys.path or sys.path[0] not in ("", os.getcwd()):
        return
    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(grape.__file__)))
    if os.path.abspath(sys.path[0] or os.curdir) != source_tree:
        del sys.path[0]


_drop_working_directory()

from grape.cli.main import main  # noqa: E402  (after the working directory is gone)

sys.exit(main())
