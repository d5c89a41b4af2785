"""`python -m shardline.worker`: start one engine group's leader (see rank_main)."""

import sys

from shardline.worker.rank_main import main

if __name__ == "__main__":
    sys.exit(main())
