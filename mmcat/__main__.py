"""``python -m mmcat …`` (used by ``accelerate launch -m mmcat`` and ``torchrun -m mmcat``)."""
import sys

from mmcat.cli import main

sys.exit(main())
