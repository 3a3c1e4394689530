"""One file per method; :func:`build_method` picks by ``method.name``."""

from __future__ import annotations

from fastssl.train.config import TrainConfig
from fastssl.train.methods.base import Method


def build_method(config: TrainConfig) -> Method:
    from fastssl.train.methods.byol import BYOL
    from fastssl.train.methods.isd import ISD
    from fastssl.train.methods.mocov2 import MoCoV2
    from fastssl.train.methods.msf import MSF
    from fastssl.train.methods.nnclr import NNCLR
    from fastssl.train.methods.ressl import ReSSL
    from fastssl.train.methods.sdssl import SDSSL

    methods = {"mocov2": MoCoV2, "isd": ISD, "ressl": ReSSL, "msf": MSF, "byol": BYOL, "nnclr": NNCLR, "sdssl": SDSSL}
    return methods[config.method.name](config)


__all__ = ["Method", "build_method"]
