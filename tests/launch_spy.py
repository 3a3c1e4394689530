"""Test helper: record the BLOCK_DC constexpr each partial-kernel launch of a kernel module compiles with."""

from __future__ import annotations

from types import ModuleType

import pytest


def record_block_dc(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[int]:
    """Wraps ``module._partial_constexprs``; the returned list grows by one BLOCK_DC per launch (so a test can tell
    that the D-chunked path ran)."""
    seen: list[int] = []
    original = module._partial_constexprs

    def spy(*args, **kwargs):
        constexprs = original(*args, **kwargs)
        seen.append(constexprs["BLOCK_DC"])
        return constexprs

    monkeypatch.setattr(module, "_partial_constexprs", spy)
    return seen
