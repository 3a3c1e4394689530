"""Counting device-to-host reads in tests: each one makes the host wait for all queued GPU work."""

from __future__ import annotations

import torch
import torch.utils._python_dispatch


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, while active, ``scalars``: aten._local_scalar_dense calls (``item()``, ``float(t)``, ``int(t)``,
    ``bool(t)``), and ``tolist``: ``Tensor.tolist`` calls, which read the data directly without dispatching.

    Args:
        host_tensors: tensors that live on the host even in a GPU run (an optimizer's ``step`` counters, unless
            ``capturable``): reading them waits for nothing, so they are not counted.
    """

    def __init__(self, host_tensors: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self._host = {t.data_ptr() for t in host_tensors}
        self.scalars = self.tolist = 0
        self._real_tolist = torch.Tensor.tolist

    def __enter__(self):
        real = self._real_tolist

        def counted(tensor):
            self.tolist += 1
            return real(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real_tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalars += args[0].data_ptr() not in self._host
        return func(*args, **(kwargs or {}))
