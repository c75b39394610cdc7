import sys

from nimblelm.cli import main

sys.exit(main())
