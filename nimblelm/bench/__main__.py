import sys

from nimblelm.bench.cli import main

sys.exit(main())
