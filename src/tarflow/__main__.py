import sys

from tarflow.cli import main

sys.exit(main())
