"""fastssl: fast, exact, kernel-backed memory-bank self-supervised learning.

``fastssl.MemoryBank`` is the FIFO bank, ``fastssl.functional`` the losses as functions, ``fastssl.losses`` the same
as modules that own their bank.
"""

from fastssl import functional, losses
from fastssl.bank import MemoryBank

__version__ = "0.1.0"
__all__ = ["MemoryBank", "functional", "losses", "__version__"]
