import sys

from ds_rlhf.cli import main

sys.exit(main())
