import sys

from jaxsys.cli import main

sys.exit(main())
