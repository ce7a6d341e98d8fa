import sys

from modules.cli.main import main

sys.exit(main())
