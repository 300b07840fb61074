"""mage: the MAGE model layer built on mage_kernels."""

import mage_kernels  # noqa: F401

__version__ = "0.1.0"
