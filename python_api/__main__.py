import sys

from python_api.cli import main

sys.exit(main())
