import sys

from polyft.cli.main import main

sys.exit(main())
