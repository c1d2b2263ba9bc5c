import sys

from qkvlab.cli.main import main

sys.exit(main())
