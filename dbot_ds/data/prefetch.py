"""Host-to-device copies overlapped with compute: the next batch is copied on a side stream
(from pinned memory, non_blocking) while the current step runs. A pass-through on CPU."""

from __future__ import annotations

import torch


class DevicePrefetcher:
    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        batches = iter(self.loader)
        upcoming = self._copy(next(batches, None), stream)
        while upcoming is not None:
            current.wait_stream(stream)  # the copy of this batch has landed
            batch = upcoming
            if isinstance(batch, torch.Tensor):
                batch.record_stream(current)  # allocated on the side stream, used on this one
            upcoming = self._copy(next(batches, None), stream)
            yield batch

    def _copy(self, batch, stream):
        if not isinstance(batch, torch.Tensor):  # None at the end; JPEG batches decode on device later
            return batch
        with torch.cuda.stream(stream):
            return batch.to(self.device, non_blocking=True)
