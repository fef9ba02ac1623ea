import sys

from jaxsys.cli.main import main

sys.exit(main())
