"""``python -m benchmarks [--quick] [--out FILE]``: table of ours vs peers, saved as JSON."""
import sys

from molrg_ext.bench import main

sys.exit(main())
