import sys

from sglbatch.cli import main

sys.exit(main())
