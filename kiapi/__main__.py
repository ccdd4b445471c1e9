import sys

from kiapi.cli import main

sys.exit(main())
