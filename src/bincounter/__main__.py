import sys

from bincounter.cli import main

sys.exit(main())
