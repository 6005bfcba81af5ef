import sys

from dynbatch.cli import main

sys.exit(main())
