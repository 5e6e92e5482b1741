import sys

from bulkhead_cli import main

sys.exit(main())
