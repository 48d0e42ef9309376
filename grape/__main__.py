import sys

from grape.cli import main

sys.exit(main())
