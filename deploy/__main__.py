"""Entry point of the packaged application (the MAP runs its application folder)."""

import sys

from app import main

sys.exit(main())
