"""One nn.Module per method. Modules that need a bank own a :class:`~fastssl.MemoryBank` (or take one) and enqueue
in the order the official code does: after the loss for ISD / ReSSL / MoCo / NNCLR, before the search for MSF.
Enqueueing happens in training mode only; a module never makes a distributed call unless a process group is
initialized (the bank all-gathers its keys then)."""

from fastssl.losses.byol import BYOLLoss
from fastssl.losses.isd import ISDLoss
from fastssl.losses.moco import MoCoLoss
from fastssl.losses.msf import MSFLoss
from fastssl.losses.nnclr import NNCLRLoss
from fastssl.losses.ressl import ReSSLLoss
from fastssl.losses.sdssl import SDSSLLoss

__all__ = ["BYOLLoss", "ISDLoss", "MSFLoss", "MoCoLoss", "NNCLRLoss", "ReSSLLoss", "SDSSLLoss"]
