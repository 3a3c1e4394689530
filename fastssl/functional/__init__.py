"""Functional bank losses: every seed method as a function of embeddings and a bank.

All functions L2-normalize their embedding inputs, use bank rows as stored, accumulate in fp32 (fp64 for fp64
inputs) and accept ``backend="auto" | "reference" | "streaming" | "triton"`` where a bank is involved.
"""

from fastssl.functional.bank_topk import bank_topk
from fastssl.functional.byol import byol_loss
from fastssl.functional.isd import isd_loss
from fastssl.functional.moco import moco_loss
from fastssl.functional.msf import msf_loss
from fastssl.functional.nnclr import nnclr_loss
from fastssl.functional.purity import mean_shift_purity
from fastssl.functional.ressl import ressl_loss
from fastssl.functional.sdssl import sdssl_alpha, sdssl_loss
from fastssl.functional.soft_bank_cross_entropy import soft_bank_cross_entropy

__all__ = [
    "bank_topk",
    "byol_loss",
    "isd_loss",
    "mean_shift_purity",
    "moco_loss",
    "msf_loss",
    "nnclr_loss",
    "ressl_loss",
    "sdssl_alpha",
    "sdssl_loss",
    "soft_bank_cross_entropy",
]
